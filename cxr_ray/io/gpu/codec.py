"""Frame codecs behind one interface: NVIDIA nvImageCodec on the GPU, Pillow as the CPU reference.

:class:`NvImageCodec` decodes a batch of code streams in one ``Decoder.decode`` call
(nvJPEG / nvJPEG2000 on the GPU; the CPU does only their entropy-decoding stages it must) and
hands each image to torch through DLPack, so it never leaves the device. nvImageCodec is
imported when one is built, through :func:`cxr_ray.optional.require`, so this module imports
on a machine without it. Its Python API (0.9) decodes at full resolution: it has no reduced-
resolution option for JPEG (DCT scaling) or JPEG 2000 (resolution levels) as Pillow has on the
CPU path, so the GPU path box-reduces on the device after decoding.

:class:`PillowCodec` decodes the same frames with the CPU path's own Pillow decoders at full
resolution and puts them on the requested device: the reference the GPU path is tested
against on machines without a GPU, and what ``cxr-ray bench gpu --device cpu`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
import torch.utils.dlpack

from cxr_ray.errors import BackendUnavailableError, DecodeError
from cxr_ray.io import raster
from cxr_ray.io.gpu.mode import NVIMGCODEC_MODULE, join_nvidia_namespace, nvimgcodec_available
from cxr_ray.io.gpu.routes import JPEG, JPEG2000_CODEC
from cxr_ray.optional import require

__all__ = ["NVIMGCODEC_HINT", "CodedFrame", "FrameCodec", "NvImageCodec", "PillowCodec", "import_nvimgcodec",
           "nvimgcodec_available"]

NVIMGCODEC_HINT = (
    "GPU decoding needs NVIDIA nvImageCodec: pip install 'cxr-ray[gpu-decode]' (nvidia-nvimgcodec-cu13 with "
    "its nvjpeg and nvjpeg2k extras, for CUDA 13 builds of torch; use the gpu-decode-cu12 extra for CUDA 12)"
)


def import_nvimgcodec() -> ModuleType:
    join_nvidia_namespace()
    return require(NVIMGCODEC_MODULE, NVIMGCODEC_HINT)


@dataclass(frozen=True)
class CodedFrame:
    """One code stream to decode: a DICOM frame or a JPEG file, with what its headers declared."""

    data: bytes
    codec: str  # routes.JPEG | JPEG2000_CODEC | HTJ2K_CODEC
    rows: int
    cols: int
    precision: int  # bits per sample the stored values have (8 for JPEG files)
    to_grey: bool = False  # a JPEG file: luma of colour images


class FrameCodec(Protocol):
    name: str
    device: torch.device

    def decode(self, frames: Sequence[CodedFrame]) -> list[torch.Tensor | None]:
        """(rows, cols) integer tensors on ``device`` holding the stored values; None where refused."""
        ...


def cuda_device(device: str | torch.device | None) -> torch.device:
    """The CUDA device to decode on; :class:`BackendUnavailableError` where torch sees no GPU."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("GPU decoding needs a CUDA GPU; torch sees none (use --decode cpu)")
    dev = torch.device("cuda" if device is None else device)
    if dev.type != "cuda":
        raise BackendUnavailableError(f"GPU decoding runs on CUDA devices, got {dev}")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


class NvImageCodec:
    """nvImageCodec's decoder on one GPU; stored values out, never scaled to 8 bits."""

    name = "nvimgcodec"

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = cuda_device(device)  # refuse before importing anything
        self.nv = import_nvimgcodec()
        self.version = str(getattr(self.nv, "__version__", "unknown"))
        self._decoder = self.nv.Decoder(device_id=self.device.index)
        # UNCHANGED: a grey frame stays one channel; allow_any_depth: 12/16-bit samples stay as stored.
        # EXIF orientation is never applied (the CPU path does not either: radiographs do not use it).
        spec = self.nv.ColorSpec
        self._stored = self.nv.DecodeParams(
            allow_any_depth=True, color_spec=spec.UNCHANGED, apply_exif_orientation=False)
        # JPEG files: luma straight from nvJPEG where the enum has GRAY, else RGB made grey below.
        self._grey = self.nv.DecodeParams(
            allow_any_depth=False, color_spec=getattr(spec, "GRAY", spec.SRGB), apply_exif_orientation=False)

    def _run(self, frames: Sequence[CodedFrame], params: Any) -> list[torch.Tensor | None]:
        if not frames:
            return []
        streams = [self.nv.CodeStream(frame.data) for frame in frames]
        stream = torch.cuda.current_stream(self.device).cuda_stream  # torch's later ops are ordered after it
        images = self._decoder.decode(streams, params=params, cuda_stream=stream)
        return [None if image is None else _grey_tensor(_as_tensor(image, self.device, stream), frame.to_grey)
                for frame, image in zip(frames, images, strict=True)]

    def decode(self, frames: Sequence[CodedFrame]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(frames)
        for to_grey in (False, True):
            index = [i for i, frame in enumerate(frames) if frame.to_grey == to_grey]
            decoded = self._run([frames[i] for i in index], self._grey if to_grey else self._stored)
            for i, tensor in zip(index, decoded, strict=True):
                out[i] = tensor
        return out


def _as_tensor(image: Any, device: torch.device, stream: int) -> torch.Tensor:
    """An nvImageCodec image as a torch tensor on ``device``, zero-copy (DLPack, else the CUDA array interface)."""
    try:  # nvImageCodec's __dlpack__ takes ``cuda_stream``, not the protocol's ``stream``
        return torch.utils.dlpack.from_dlpack(image.__dlpack__(cuda_stream=stream))
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return torch.as_tensor(image, device=device)


def _grey_tensor(tensor: torch.Tensor, to_grey: bool) -> torch.Tensor | None:
    """(H, W[, C]) samples as (H, W) integers; RGB to luma as Pillow's ``convert("L")`` computes it
    (for JPEG files only); None for anything else (the frame then goes to the CPU decoder)."""
    if tensor.ndim == 3 and tensor.shape[-1] == 3 and to_grey:
        rgb = tensor.to(torch.int32)
        return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    if tensor.ndim == 3:
        if tensor.shape[-1] != 1:
            return None
        tensor = tensor[..., 0]
    # uint16 has few torch kernels: the value steps get int32 (exact for every stored value)
    return tensor if tensor.dtype in (torch.uint8, torch.int16, torch.int32) else tensor.to(torch.int32)


class PillowCodec:
    """The CPU path's own Pillow decoders at full resolution, onto ``device`` (the reference)."""

    name = "pillow"

    def __init__(self, device: str | torch.device = "cpu", max_pixels: int = 64_000_000) -> None:
        self.device = torch.device(device)
        self.max_pixels = max_pixels

    def _one(self, frame: CodedFrame) -> np.ndarray | None:
        try:
            if frame.codec == JPEG:
                size = None if frame.to_grey else (frame.cols, frame.rows)
                return raster.decode_jpeg_grey(frame.data, "frame", self.max_pixels, None, size)
            if frame.codec == JPEG2000_CODEC:
                return raster.decode_j2k_grey(
                    frame.data, "frame", self.max_pixels, None, (frame.cols, frame.rows), frame.precision)
        except (DecodeError, OSError, ValueError):
            return None
        return None  # HTJ2K: Pillow has no decoder; pydicom's plugin does it on the CPU path

    def decode(self, frames: Sequence[CodedFrame]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for frame in frames:
            pixels = self._one(frame)
            out.append(None if pixels is None else torch.from_numpy(pixels.astype(np.int32)).to(self.device))
        return out
