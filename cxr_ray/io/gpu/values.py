"""The CPU path's value steps (:mod:`cxr_ray.io.dicom.values`), as torch ops on a tensor of any device.

Box reduction, modality LUT / rescale, VOI LUT / window (min-max when neither), MONOCHROME1
inversion and the [0, 1] clip, in the same order and float32 arithmetic as the numpy path,
reading the same :class:`~cxr_ray.io.dicom.values.GreyTransform`. So a frame decoded on the GPU
gives the pixels the CPU decoder would give for the same stored values:
``tests/test_gpu_values.py`` runs both on CPU tensors and holds them to :data:`VALUES_ATOL`.

Scalars are rounded to float32 first (``_f32``), as ``np.float32(...)`` does on the CPU path,
so each elementwise step rounds the same way on both sides; the sigmoid's ``exp`` may differ in
the last bit between libm and CUDA, hence a tolerance rather than equality.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray.io.dicom.values import GreyTransform, window_valid
from cxr_ray.io.raster import reduction_factor

# Largest |GPU - CPU| on [0, 1] pixels for the same stored values (measured 0 on CPU tensors except
# the sigmoid window, a few float32 ulps); the end-to-end decode adds the codecs' own differences.
VALUES_ATOL = 1e-5


def _f32(value: float) -> float:
    """``value`` rounded to float32, as the numpy path's ``np.float32(value)``."""
    return float(np.float32(value))


def reduce_tensor(pixels: torch.Tensor, target_size: int | None) -> torch.Tensor:
    """:func:`cxr_ray.io.raster.reduce_float` on a float32 (H, W) tensor: an integer box average
    (partial boxes at the edges average what they hold, as Pillow's ``Image.reduce``)."""
    factor = reduction_factor(pixels.shape[0], pixels.shape[1], target_size)
    if factor < 2:
        return pixels
    pooled = F.avg_pool2d(pixels[None, None], factor, stride=factor, ceil_mode=True, count_include_pad=False)
    return pooled[0, 0]


def _apply_window(pixels: torch.Tensor, center: float, width: float, function: str) -> torch.Tensor | None:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]; None when the window is invalid (the caller notes it)."""
    if not window_valid(center, width, function):
        return None
    if function == "SIGMOID":
        out = (pixels - _f32(center)) * _f32(-4.0 / width)
        return torch.reciprocal(torch.exp(out) + 1.0)
    if function == "LINEAR_EXACT":
        out = (pixels - _f32(center)) * _f32(1.0 / width)
    elif width == 1:  # degenerate LINEAR: a threshold at center - 0.5
        return (pixels > _f32(center - 0.5)).to(torch.float32)
    else:
        out = (pixels - _f32(center - 0.5)) * _f32(1.0 / (width - 1.0))
    return torch.clamp(out + 0.5, 0.0, 1.0)


def _stretch(pixels: torch.Tensor, low: float, high: float, notes: list[str], constant_note: str) -> torch.Tensor:
    if high > low:
        return (pixels - _f32(low)) * _f32(1.0 / (high - low))
    notes.append(constant_note)
    return torch.zeros_like(pixels)


def _window_or_min_max(pixels: torch.Tensor, window: tuple[float, float, str] | None, notes: list[str]) -> torch.Tensor:
    if window is not None:
        out = _apply_window(pixels, *window)
        if out is not None:
            return out
        notes.append(f"window width {window[1]} invalid for {window[2]}; used min-max")
    # .item() waits for the device: only images without a usable window pay for it
    return _stretch(pixels, float(pixels.min().item()), float(pixels.max().item()), notes, "image is constant")


def _apply_lut(pixels: torch.Tensor, first: int, lut: torch.Tensor) -> torch.Tensor:
    index = pixels.to(torch.int64) - first
    return lut[torch.clamp(index, 0, lut.numel() - 1)]


def grey_to_unit_tensor(
    pixels: torch.Tensor, transform: GreyTransform, target_size: int | None, notes: list[str]
) -> torch.Tensor:
    """Stored values (H, W), integer or float, on any device -> float32 [0, 1] on that device.

    The numpy path's :func:`~cxr_ray.io.dicom.values.apply_grey_transform` step by step,
    then MONOCHROME1 inversion and the clip, as :func:`~cxr_ray.io.dicom.decoder.decode_dicom` does.
    """
    device = pixels.device
    modality_lut, voi_lut, rescale = transform.modality_lut, transform.voi_lut, transform.rescale
    if modality_lut is None and voi_lut is None:
        out = reduce_tensor(pixels.to(torch.float32), target_size)
        if rescale is not None:
            out = out * _f32(rescale[0]) + _f32(rescale[1])
        out = _window_or_min_max(out, transform.window, notes)
    else:
        if modality_lut is not None:
            values = _apply_lut(pixels, modality_lut[0], torch.from_numpy(modality_lut[1]).to(device))
        elif rescale is not None:
            values = pixels.to(torch.float32) * _f32(rescale[0]) + _f32(rescale[1])
        else:
            values = pixels
        if voi_lut is None:
            out = reduce_tensor(_window_or_min_max(values.to(torch.float32), transform.window, notes), target_size)
        else:
            first, lut = voi_lut
            indexed = torch.round(values) if values.is_floating_point() else values
            out = _apply_lut(indexed, first, torch.from_numpy(lut).to(device))
            out = _stretch(out, float(lut.min()), float(lut.max()), notes, "VOI LUT is constant")
            out = reduce_tensor(out, target_size)
    if transform.monochrome1:
        out = 1.0 - out
    return torch.clamp(out, 0.0, 1.0)


def unit_from_integers(pixels: torch.Tensor, bits: int, target_size: int | None) -> torch.Tensor:
    """8- or 16-bit raster samples -> [0, 1] by their container's full scale (PNG / JPEG files:
    :func:`cxr_ray.io.raster.decode_raster` divides by 255 or 65535, never stretches)."""
    out = reduce_tensor(pixels.to(torch.float32), target_size)
    return out * _f32(1.0 / (255.0 if bits <= 8 else 65535.0))
