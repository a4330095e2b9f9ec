"""A batch of inputs decoded on the GPU: the same guards first, then one codec call, values on the device.

For each input, in this order:

1. read its bytes (:func:`cxr_ray.io.inputs.read_input`: size limit, ``read_failed``);
2. the CPU path's guards, unchanged: DICOM header and Pixel Data checks
   (:func:`~cxr_ray.io.dicom.decoder.check_dicom`) and, for compressed frames, the codestream's own
   header against the DICOM header (:func:`~cxr_ray.io.dicom.pixels.read_codestream`); PNG / JPEG
   headers and pixel limits (:func:`~cxr_ray.io.raster.open_image`). A refused input gets the
   same :class:`~cxr_ray.errors.DecodeError` as on the CPU, and no codec sees it;
3. its route (:mod:`~cxr_ray.io.gpu.routes`): a GPU codec, the native copy, or the CPU decoder;
4. every GPU-routed frame of the batch through ONE codec call; a frame the codec refuses (or
   returns in another shape) goes to the CPU decoder, the reason in its ``warnings``;
5. the values (:mod:`~cxr_ray.io.gpu.values`) on the device: box reduction towards
   ``target_size``, modality LUT / rescale, VOI LUT / window, MONOCHROME1, clip.

Out comes, per input, a :class:`DeviceImage` (float32 (H, W) tensor on the device), a
:class:`~cxr_ray.io.types.DecodedImage` from the CPU decoder, or the :class:`DecodeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from cxr_ray.errors import BackendUnavailableError, DecodeError
from cxr_ray.io import raster
from cxr_ray.io.decode import sniff_format
from cxr_ray.io.dicom.decoder import CheckedDicom, check_dicom, dicom_metadata, values_error
from cxr_ray.io.dicom.pixels import read_codestream
from cxr_ray.io.dicom.tags import has_dicom_preamble
from cxr_ray.io.dicom.values import grey_transform
from cxr_ray.io.gpu.codec import CodedFrame, FrameCodec, NvImageCodec
from cxr_ray.io.gpu.mode import check_decode_mode
from cxr_ray.io.gpu.routes import NATIVE, Route, cpu, dicom_route, raster_route
from cxr_ray.io.gpu.values import grey_to_unit_tensor, unit_from_integers
from cxr_ray.io.inputs import InputPolicy, display_name, load_input, read_input
from cxr_ray.io.types import DecodedImage, ImageMetadata

CPU_NOTE = "decoded on the CPU: "  # how a fallback reads in a row's warnings


@dataclass(frozen=True)
class DeviceImage:
    """A radiograph decoded on the device: float32 (H, W) in [0, 1], 1.0 = most attenuating."""

    pixels: torch.Tensor
    meta: ImageMetadata


Decoded = DeviceImage | DecodedImage | DecodeError


@dataclass
class _Planned:
    """One input between the guards and the values: what it needs, and what it was decided."""

    data: bytes
    name: str
    route: Route
    checked: CheckedDicom | None = None
    frame: CodedFrame | None = None
    meta: ImageMetadata | None = None  # raster inputs: known from the header


def _stored_values(checked: CheckedDicom) -> torch.Tensor:
    """Frame 0 of native Pixel Data as stored integers, unused high bits cleared (or sign-extended)."""
    hdr = checked.hdr
    signed = hdr.pixel_representation == 1
    dtype = {8: np.int8 if signed else np.uint8, 16: np.dtype("<i2") if signed else np.dtype("<u2")}[hdr.bits_allocated]
    values = np.frombuffer(checked.src, dtype=dtype, count=hdr.rows * hdr.cols).astype(np.int32)
    if hdr.bits_stored < hdr.bits_allocated:  # as pydicom does on the CPU path: bits above BitsStored are no image
        values &= (1 << hdr.bits_stored) - 1
        if signed:  # sign-extend from bit BitsStored - 1
            sign = 1 << (hdr.bits_stored - 1)
            values = (values ^ sign) - sign
    return torch.from_numpy(values.reshape(hdr.rows, hdr.cols))


def _as_decode_error(name: str, exc: BaseException) -> DecodeError:
    """Any failure as the CPU path reports it (:func:`cxr_ray.io.decode.decode_image`'s mapping)."""
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
        return DecodeError("too_large", f"{name}: ran out of memory while decoding")
    return DecodeError("corrupt", f"{name}: could not be decoded ({type(exc).__name__})")


class GpuDecoder:
    """Decode batches of inputs with ``codec`` (nvImageCodec on ``device`` unless given)."""

    def __init__(self, policy: InputPolicy, *, device: str | torch.device | None = None,
                 codec: FrameCodec | None = None) -> None:
        self.policy = policy
        self.codec = codec if codec is not None else NvImageCodec(device)  # refuses without CUDA / nvImageCodec
        self.device = self.codec.device

    # ------------------------------------------------------------------ planning (guards, routes)
    def _plan_dicom(self, data: bytes, name: str) -> _Planned:
        checked = check_dicom(data, name, policy=self.policy.decode, preamble=has_dicom_preamble(data))
        hdr = checked.hdr
        stream = read_codestream(checked.src, hdr, name) if hdr.transfer_syntax.is_encapsulated else None  # type: ignore[arg-type]
        route = dicom_route(hdr, stream.precision if stream else None, stream.signed if stream else False)
        frame = None
        if stream is not None and route.codec is not None:
            frame = CodedFrame(stream.frame, route.codec, hdr.rows, hdr.cols, hdr.bits_stored)
        return _Planned(data, name, route, checked=checked, frame=frame)

    def _plan(self, data: bytes, name: str) -> _Planned:
        fmt = sniff_format(data) if data else None
        if fmt == "dicom":
            return self._plan_dicom(data, name)
        if fmt == "jpeg":
            image = raster.open_image(data, name, "jpeg", self.policy.decode.max_pixels)  # the CPU path's guards
            width, height = image.size
            route = raster_route(fmt, image.mode)
            frame = CodedFrame(data, route.codec, height, width, 8, to_grey=True) if route.codec else None
            return _Planned(data, name, route, frame=frame, meta=raster.raster_metadata(fmt, width, height, image.mode))
        return _Planned(data, name, raster_route(fmt, "") if fmt else cpu("not a DICOM / JPEG file"))

    # ------------------------------------------------------------------ finishing
    def _on_cpu(self, item: _Planned, uri: str, reason: str | None) -> DecodedImage:
        image = load_input(uri, self.policy, data=item.data, name=item.name).image
        if reason is None:
            return image
        return replace(image, meta=replace(image.meta, warnings=(*image.meta.warnings, CPU_NOTE + reason)))

    def _values(self, item: _Planned, stored: torch.Tensor) -> DeviceImage:
        target = self.policy.target_size
        if item.checked is None:  # a JPEG file: 8-bit samples by their full scale
            assert item.meta is not None
            return DeviceImage(unit_from_integers(stored, 8, target), item.meta)
        ds, hdr = item.checked.ds, item.checked.hdr
        try:
            pixels = grey_to_unit_tensor(stored, grey_transform(ds, hdr), target, hdr.warnings)
        except DecodeError:
            raise
        except Exception as exc:  # malformed LUT / window / rescale attributes: the CPU path's code
            raise values_error(item.name, exc) from None
        return DeviceImage(pixels, dicom_metadata(ds, hdr, self.policy.pseudonym_key))

    def decode(self, uris: Sequence[str], data: Sequence[bytes | None] | None = None,
               names: Sequence[str] | None = None) -> list[Decoded]:
        """One result per input, in order; ``data``: bytes already read (None entries are read here)."""
        results: list[Decoded | None] = [None] * len(uris)
        planned: list[_Planned | None] = [None] * len(uris)
        for i, uri in enumerate(uris):
            name = names[i] if names is not None else display_name(uri)
            try:
                raw = data[i] if data is not None and data[i] is not None else read_input(uri, self.policy, name)
                planned[i] = self._plan(raw, name)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - this input's error, never its neighbours'
                results[i] = _as_decode_error(name, exc)
        coded = [i for i, p in enumerate(planned) if p is not None and p.frame is not None]
        tensors = dict(zip(coded, self.codec.decode([planned[i].frame for i in coded]), strict=True))  # type: ignore[union-attr, misc]
        for i, item in enumerate(planned):
            if item is None:
                continue
            try:
                results[i] = self._finish(item, uris[i], tensors.get(i))
            except Exception as exc:  # noqa: BLE001 - this input's error, never its neighbours'
                results[i] = _as_decode_error(item.name, exc)
        return results  # type: ignore[return-value]

    def _finish(self, item: _Planned, uri: str, tensor: torch.Tensor | None) -> Decoded:
        if item.route.codec == NATIVE:
            assert item.checked is not None
            return self._values(item, _stored_values(item.checked).to(self.device))
        if item.route.codec is None:
            return self._on_cpu(item, uri, item.route.reason)
        if tensor is None:
            return self._on_cpu(item, uri, f"{self.codec.name} could not decode the {item.route.codec} frame")
        assert item.frame is not None
        if tuple(tensor.shape) != (item.frame.rows, item.frame.cols):
            return self._on_cpu(item, uri, f"{self.codec.name} returned {tuple(tensor.shape)}, "
                                           f"the header says {(item.frame.rows, item.frame.cols)}")
        return self._values(item, tensor)


def open_gpu_decoder(mode: str, policy: InputPolicy, device: str | torch.device | None = None,
                     ) -> tuple[GpuDecoder | None, str | None]:
    """The decoder ``--decode mode`` asks for here: (decoder, None), or (None, why not) for ``auto``.

    ``gpu`` where it cannot run raises :class:`~cxr_ray.errors.BackendUnavailableError` (say so at
    start, not per row); ``cpu`` is (None, None).
    """
    check_decode_mode(mode)
    if mode == "cpu":
        return None, None
    try:
        return GpuDecoder(policy, device=device), None
    except BackendUnavailableError as exc:
        if mode == "gpu":
            raise
        return None, str(exc)
