"""Stored values to [0, 1]: modality LUT / rescale, VOI LUT / window (min-max when neither), colour to luminance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from cxr_ray.io import raster
from cxr_ray.io.dicom.header import Header

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    if not isinstance(center, str | bytes) and hasattr(center, "__len__"):
        center = center[0]
    if not isinstance(width, str | bytes) and hasattr(width, "__len__"):
        width = width[0]
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    return float(center), float(width), function


def window_valid(center: float, width: float, function: str) -> bool:
    """Whether PS3.3 C.11.2.1.2 defines this window (else min-max is used, with a note)."""
    if not (math.isfinite(center) and math.isfinite(width)):
        return False
    return width > 0 if function in ("SIGMOID", "LINEAR_EXACT") else width >= 1


def _apply_window(pixels: np.ndarray, center: float, width: float, function: str) -> bool:
    """PS3.3 C.11.2.1.2 windowing to [0, 1], in place. False when the width is invalid."""
    if not window_valid(center, width, function):
        return False
    if function == "SIGMOID":
        pixels -= np.float32(center)
        pixels *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):
            np.exp(pixels, out=pixels)
        pixels += np.float32(1.0)
        np.reciprocal(pixels, out=pixels)
        return True
    if function == "LINEAR_EXACT":
        pixels -= np.float32(center)
        pixels *= np.float32(1.0 / width)
    else:  # LINEAR (the default, and what an unknown function falls back to)
        if width == 1:  # degenerate: a threshold at center - 0.5
            np.greater(pixels, np.float32(center - 0.5), out=pixels, casting="unsafe")
            return True
        pixels -= np.float32(center - 0.5)
        pixels *= np.float32(1.0 / (width - 1.0))
    pixels += np.float32(0.5)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return True


def _min_max(pixels: np.ndarray, notes: list[str]) -> None:
    _stretch(pixels, float(pixels.min()), float(pixels.max()), notes, "image is constant")


def _stretch(pixels: np.ndarray, low: float, high: float, notes: list[str], constant_note: str) -> None:
    """[low, high] -> [0, 1] in place; all zeros (and a note) when the range is empty."""
    if high > low:
        pixels -= np.float32(low)
        pixels *= np.float32(1.0 / (high - low))
    else:
        notes.append(constant_note)
        pixels.fill(0.0)


def _lut(
    ds: Dataset, keyword: str, little_endian: bool, signed: bool
) -> tuple[int, np.ndarray] | None:
    """(first mapped value, LUT entries as float32) of a Modality / VOI LUT Sequence item.

    Parsed here rather than with pydicom's ``apply_modality_lut`` because pydicom
    builds a ``uint<bits>`` dtype from the descriptor and so fails on the common
    12-bit LUTs (``uint12``).
    """
    sequence = ds.get(keyword)
    if not sequence:
        return None
    item = sequence[0]
    descriptor, element = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or element is None or item["LUTData"].is_empty:
        return None
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    if signed and first >= 32768:  # first value written as US although pixels are signed
        first -= 65536
    data = item["LUTData"]
    if isinstance(data.value, bytes | bytearray):
        values = np.frombuffer(data.value, dtype="<u2" if little_endian else ">u2")
    else:
        values = np.asarray(data.value if data.VM > 1 else [data.value], dtype=np.int64)
    if values.size < entries:
        raise ValueError(f"{keyword} has {values.size} entries, its descriptor says {entries}")
    return first, values[:entries].astype(np.float32)


def _apply_lut(pixels: np.ndarray, first: int, lut: np.ndarray) -> np.ndarray:
    """LUT lookup: values below ``first`` take entry 0, above the table the last entry."""
    index = pixels.astype(np.int64) - first
    np.clip(index, 0, lut.size - 1, out=index)
    return lut[index]


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return None
    slope, intercept = float(slope), float(intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ValueError("rescale slope/intercept are not usable numbers")
    if slope == 1.0 and intercept == 0.0:
        return None
    return slope, intercept


@dataclass(frozen=True)
class GreyTransform:
    """What a grey DICOM's header asks of its stored values, read once (the CPU path and the GPU path,
    :mod:`cxr_ray.io.gpu.values`, both apply exactly this)."""

    modality_lut: tuple[int, np.ndarray] | None  # (first mapped value, float32 entries)
    voi_lut: tuple[int, np.ndarray] | None
    rescale: tuple[float, float] | None  # (slope, intercept); None without one, or with a Modality LUT
    window: tuple[float, float, str] | None  # (center, width, function) as written; validity is checked on use
    monochrome1: bool


def grey_transform(ds: Dataset, hdr: Header) -> GreyTransform:
    """The modality LUT / rescale, VOI LUT / window and MONOCHROME1 of a grey dataset.

    Malformed attributes raise (``ValueError`` and the like): the decoder reports them as ``corrupt``.
    """
    signed = hdr.pixel_representation == 1
    modality_lut = _lut(ds, "ModalityLUTSequence", hdr.little_endian, signed)
    return GreyTransform(
        modality_lut=modality_lut,
        voi_lut=_lut(ds, "VOILUTSequence", hdr.little_endian, signed),
        rescale=None if modality_lut else _rescale(ds),
        window=_window(ds),
        monochrome1=hdr.photometric == "MONOCHROME1",
    )


def _window_or_min_max_of(pixels: np.ndarray, window: tuple[float, float, str] | None, notes: list[str]) -> None:
    """``window`` in place; min-max when there is none or an invalid one (noted)."""
    if window is not None and not _apply_window(pixels, *window):
        notes.append(f"window width {window[1]} invalid for {window[2]}; used min-max")
        window = None
    if window is None:
        _min_max(pixels, notes)


def grey_to_unit(
    pixels: np.ndarray, ds: Dataset, hdr: Header, target_size: int | None, notes: list[str]
) -> np.ndarray:
    """Stored values -> modality LUT / rescale -> VOI LUT / window -> [0, 1] float32 (MONOCHROME1 not yet inverted)."""
    return apply_grey_transform(pixels, grey_transform(ds, hdr), target_size, notes)


def apply_grey_transform(
    pixels: np.ndarray, transform: GreyTransform, target_size: int | None, notes: list[str]
) -> np.ndarray:
    """:func:`grey_to_unit` with the header already read (MONOCHROME1 is the caller's last step)."""
    modality_lut, voi_lut, rescale = transform.modality_lut, transform.voi_lut, transform.rescale
    if modality_lut is None and voi_lut is None:
        # The common path: one full-size float copy, reduced, then in-place arithmetic.
        out = raster.reduce_float(pixels.astype(np.float32), target_size)
        if rescale is not None:
            out *= np.float32(rescale[0])
            out += np.float32(rescale[1])
        _window_or_min_max_of(out, transform.window, notes)
        return out
    # LUT path (rare): tables index integer values, so it runs at full size.
    if modality_lut is not None:
        values = _apply_lut(pixels, *modality_lut)
    elif rescale is not None:
        values = pixels.astype(np.float32) * np.float32(rescale[0]) + np.float32(rescale[1])
    else:
        values = pixels
    if voi_lut is None:
        out = values.astype(np.float32)
        _window_or_min_max_of(out, transform.window, notes)
        return raster.reduce_float(out, target_size)
    first, lut = voi_lut
    out = _apply_lut(np.rint(values) if values.dtype.kind == "f" else values, first, lut)
    _stretch(out, float(lut.min()), float(lut.max()), notes, "VOI LUT is constant")  # the table's own output range
    return raster.reduce_float(out, target_size)


def colour_to_unit(pixels: np.ndarray, hdr: Header, target_size: int | None) -> np.ndarray:
    grey = pixels @ _LUMA  # (H, W, 3) uint -> (H, W) float32
    grey = raster.reduce_float(np.ascontiguousarray(grey, dtype=np.float32), target_size)
    grey *= np.float32(1.0 / (2**hdr.bits_stored - 1))
    return grey
