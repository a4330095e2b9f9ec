"""Pixel Data: its extent checked in the original bytes, frame 0 decoded (Pillow's reduced-size decoders where they apply)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from openjpeg import get_parameters  # pylibjpeg-openjpeg: pydicom's JPEG 2000 plugin
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import as_pixel_options, get_decoder

# Private, but the only JPEG / JPEG-LS header parser that does not decode: see read_codestream.
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from cxr_ray.errors import DecodeError
from cxr_ray.io import raster
from cxr_ray.io.dicom.header import Header
from cxr_ray.io.dicom.tags import (
    FLOAT_PIXEL_DATA,
    ITEM,
    JPEG_FAMILY,
    LONG_VRS,
    PIXEL_DATA,
    SEQUENCE_DELIMITER,
    UNDEFINED_LENGTH,
)
from cxr_ray.io.types import DecodePolicy


def pixel_source(
    data: bytes, pos: int, hdr: Header, name: str, header_cut: bool
) -> bytes | memoryview:
    """The Pixel Data value, checked to be complete: a zero-copy view when native."""
    if len(data) - pos < 8:
        if header_cut:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside its header")
        raise DecodeError("no_pixel_data", f"{name}: DICOM object has no Pixel Data")
    endian = "<" if hdr.little_endian else ">"
    group, element = struct.unpack_from(endian + "HH", data, pos)
    tag = group << 16 | element
    if tag in FLOAT_PIXEL_DATA:
        raise DecodeError(
            "no_pixel_data", f"{name}: only Float Pixel Data, which radiographs never use"
        )
    if tag != PIXEL_DATA:
        raise DecodeError(
            "corrupt", f"{name}: unexpected element ({group:04X},{element:04X}) at pixel data"
        )
    if hdr.implicit_vr:
        (length,) = struct.unpack_from(endian + "I", data, pos + 4)
        start = pos + 8
    elif data[pos + 4 : pos + 6] in LONG_VRS:
        if len(data) - pos < 12:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside the Pixel Data header")
        (length,) = struct.unpack_from(endian + "I", data, pos + 8)
        start = pos + 12
    else:
        (length,) = struct.unpack_from(endian + "H", data, pos + 6)
        start = pos + 8
    view = memoryview(data)
    if hdr.transfer_syntax.is_encapsulated:
        if length != UNDEFINED_LENGTH:
            raise DecodeError(
                "corrupt", f"{name}: compressed transfer syntax but Pixel Data is not encapsulated"
            )
        # pydicom's frame parser needs bytes (or a file); the compressed stream is small.
        return bytes(view[start : _encapsulated_end(data, start, name)])
    if length == UNDEFINED_LENGTH:
        raise DecodeError(
            "corrupt", f"{name}: native transfer syntax but Pixel Data is encapsulated"
        )
    expected = _native_length(hdr)
    available = min(length, len(data) - start)
    if available < expected:
        raise DecodeError(
            "truncated",
            f"{name}: Pixel Data holds {available} bytes; the header ({hdr.rows}x{hdr.cols}, "
            f"{hdr.samples} sample(s), {hdr.bits_allocated} bits, {hdr.frames} frame(s)) needs {expected}",
        )
    return view[start : start + expected]


def _native_length(hdr: Header) -> int:
    values = hdr.rows * hdr.cols * hdr.frames
    if hdr.photometric == "YBR_FULL_422":  # native 4:2:2 stores 2 samples per pixel
        return values * 2 * hdr.bits_allocated // 8
    if hdr.bits_allocated == 1:
        return math.ceil(values * hdr.samples / 8)
    return values * hdr.samples * hdr.bits_allocated // 8


def _encapsulated_end(data: bytes, start: int, name: str) -> int:
    """Walk the items of encapsulated Pixel Data; return the offset of the sequence delimiter."""
    pos, size = start, len(data)
    while True:
        if pos + 8 > size:
            raise DecodeError(
                "truncated", f"{name}: encapsulated Pixel Data ends before its delimiter"
            )
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if (group, element) == SEQUENCE_DELIMITER:
            return pos
        if (group, element) != ITEM or length == UNDEFINED_LENGTH:
            raise DecodeError(
                "corrupt",
                f"{name}: encapsulated Pixel Data has a malformed item ({group:04X},{element:04X})",
            )
        pos += 8 + length
        if pos > size:
            raise DecodeError("truncated", f"{name}: encapsulated Pixel Data fragment is cut off")


@dataclass(frozen=True)
class _Codestream:
    """Frame 0 of encapsulated Pixel Data and what its own header declares."""

    frame: bytes
    rows: int
    cols: int
    components: int
    precision: int
    signed: bool


def read_codestream(src: bytes, hdr: Header, name: str) -> _Codestream | None:
    """Frame 0's JPEG / JPEG-LS / JPEG 2000 header, checked against the DICOM header.

    Decoders allocate what the codestream declares, not what the DICOM header
    says, so a small file whose codestream claims 60,000 x 60,000 pixels would
    pass the pixel limit and then ask the decoder for gigabytes (5.3 GB
    measured for a 30,000-pixel JPEG 2000 claim, before the decoder gave up).
    Both headers are parsed without decoding: pydicom's own JPEG parser
    (libjpeg's ``get_parameters`` allocates the whole image) and OpenJPEG's
    header reader. None for syntaxes without such a header (RLE).
    """
    ts = hdr.transfer_syntax
    if ts not in JPEG_FAMILY and ts not in JPEG2000TransferSyntaxes:
        return None
    try:
        frame = get_frame(src, 0, number_of_frames=hdr.frames)
    except Exception:  # noqa: BLE001 - pydicom's item parser: any failure is a broken encapsulation
        raise DecodeError("corrupt", f"{name}: encapsulated Pixel Data holds no readable frame") from None
    if ts in JPEG_FAMILY:
        info = _get_jpg_parameters(frame)
        if not info.get("height") or not info.get("width"):
            raise DecodeError("corrupt", f"{name}: the {ts.name} frame has no readable JPEG header")
        stream = _Codestream(frame, info["height"], info["width"], info["components"], info["precision"], False)
    else:
        try:
            info = get_parameters(frame)
        except Exception:  # noqa: BLE001 - OpenJPEG's header reader: RuntimeError, ValueError, ...
            raise DecodeError("corrupt", f"{name}: the {ts.name} frame has no readable JPEG 2000 header") from None
        stream = _Codestream(
            frame, info["rows"], info["columns"], info["samples_per_pixel"], info["precision"], info["is_signed"]  # type: ignore[arg-type]
        )
    if (stream.rows, stream.cols) != (hdr.rows, hdr.cols) or stream.components not in (1, 3, 4):
        raise DecodeError(
            "corrupt",
            f"{name}: the {ts.name} frame declares {stream.cols}x{stream.rows} pixels and "
            f"{stream.components} component(s); the DICOM header says {hdr.cols}x{hdr.rows}",
        )
    return stream


def decode_frame(
    src: bytes | memoryview,
    ds: Dataset,
    hdr: Header,
    policy: DecodePolicy,
    name: str,
    target_size: int | None,
) -> np.ndarray:
    """Frame 0 as an integer array: (rows, cols) grey or (rows, cols, 3) RGB, maybe reduced in size."""
    stream = read_codestream(src, hdr, name) if hdr.transfer_syntax.is_encapsulated else None  # type: ignore[arg-type]
    if (
        stream is not None
        and hdr.transfer_syntax in (JPEGBaseline8Bit, JPEGExtended12Bit)
        and hdr.samples == 1
        and hdr.bits_allocated == 8
        and hdr.pixel_representation == 0
    ):
        pixels = _pillow_or_none(
            raster.decode_jpeg_grey, stream.frame, name, policy.max_pixels, target_size, (hdr.cols, hdr.rows)
        )
        if pixels is not None:
            return pixels
    if (
        stream is not None
        and target_size
        and hdr.transfer_syntax in (JPEG2000Lossless, JPEG2000)
        and hdr.samples == 1
        and hdr.pixel_representation == 0
        # pydicom reconciles a codestream that disagrees with the header; leave those to it
        and (stream.components, stream.precision, stream.signed) == (1, hdr.bits_stored, False)
    ):
        pixels = _pillow_or_none(
            raster.decode_j2k_grey,
            stream.frame, name, policy.max_pixels, target_size, (hdr.cols, hdr.rows), hdr.bits_stored,
        )
        if pixels is not None:
            return pixels
    try:
        options = as_pixel_options(ds)
        options["number_of_frames"] = hdr.frames
        options["pixel_keyword"] = "PixelData"
        # A zero-copy view only where no unused-bit correction is due (pydicom
        # would log a warning per file otherwise, and copy anyway).
        view_only = hdr.bits_stored == hdr.bits_allocated
        pixels, _ = get_decoder(hdr.transfer_syntax).as_array(
            src, index=0, view_only=view_only, as_rgb=True, **options  # type: ignore[arg-type]
        )
    except Exception as exc:  # codec and plugin errors of every kind
        text = str(exc).lower()
        code = "truncated" if ("less than expected" in text or "truncat" in text) else "corrupt"
        raise DecodeError(
            code,
            f"{name}: pixel data could not be decoded ({hdr.transfer_syntax.name}, {type(exc).__name__})",
        ) from None
    expected = (hdr.rows, hdr.cols) if hdr.samples == 1 else (hdr.rows, hdr.cols, 3)
    if pixels.shape != expected:
        raise DecodeError(
            "corrupt", f"{name}: decoded shape {pixels.shape} does not match the header {expected}"
        )
    return pixels


def _pillow_or_none(decode, *args) -> np.ndarray | None:
    """A frame through one of Pillow's reduced-size decoders (JPEG DCT scaling, JPEG 2000
    resolution levels); None lets pydicom's decoder try it instead, whatever Pillow refused."""
    try:
        return decode(*args)
    except (DecodeError, ValueError, OSError):
        return None
