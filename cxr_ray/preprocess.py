"""The one preprocessing function every surface applies (train, screen, serve, explain).

Its parameters live in ``model.json`` so an artifact always brings its own
preprocessing: the decoded [0, 1] grey image is resized to a square of
``image_size`` (:func:`resize_square`) and standardised (:func:`standardise`).
Models take ONE input channel: pretrained RGB first-layer kernels are summed
at build time (timm's ``adapt_input_conv``), so no work is spent copying grey
into three channels.

Two standardisations:

* ``fixed``: ``(x - mean) / std`` with the architecture's (ImageNet grey)
  constants, what pretrained weights expect;
* ``per_image``: each image minus its own mean, over its own standard
  deviation. Films from different sources differ in exposure, processing and
  bit depth; this removes the global level and contrast, so a model trained
  from scratch cannot tell sources apart by brightness alone.

Training caches the resized unit image and standardises after augmentation
with the same :func:`standardise` (it takes numpy arrays and torch tensors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Largest |preprocess_tensor - preprocess| on [0, 1] images before standardising: torch's antialiased
# bilinear resize computes Pillow's BILINEAR filter in a different order (2e-5 seen at 224 px).
RESIZE_ATOL = 5e-5

# ImageNet mean/std averaged over RGB: the grey equivalent of the usual constants.
IMAGENET_GREY_MEAN = float(np.mean([0.485, 0.456, 0.406]))
IMAGENET_GREY_STD = float(np.mean([0.229, 0.224, 0.225]))
NORMALIZATIONS = ("fixed", "per_image")
_MIN_STD = 1e-3  # a blank image stays finite (and blank) under per-image standardisation


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    mean: float = IMAGENET_GREY_MEAN
    std: float = IMAGENET_GREY_STD
    normalization: str = "fixed"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r}: valid are {', '.join(NORMALIZATIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        return cls(image_size=int(data["image_size"]), mean=float(data["mean"]), std=float(data["std"]),
                   normalization=str(data.get("normalization", "fixed")))


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 (H, W) image to (size, size) with an antialiased bilinear filter."""
    if pixels.shape == (size, size):
        return pixels.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


Array = TypeVar("Array", np.ndarray, Any)  # numpy array or torch tensor


def standardise(unit: Array, config: PreprocessConfig) -> Array:
    """Unit images (..., S, S) in [0, 1] -> model inputs; numpy arrays or torch tensors alike.

    ``per_image`` statistics are taken over the last two axes of each image
    (population std), so a batch (N, 1, S, S) and one image (1, S, S) give the
    same numbers for the same film.
    """
    if config.normalization == "fixed":
        return (unit - config.mean) / config.std
    if isinstance(unit, np.ndarray):
        mean = unit.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
        std = unit.std(axis=(-2, -1), keepdims=True, dtype=np.float64)
        return ((unit - mean) / np.maximum(std, _MIN_STD)).astype(np.float32, copy=False)
    dims = (-2, -1)
    mean = unit.double().mean(dim=dims, keepdim=True)
    std = unit.double().std(dim=dims, keepdim=True, correction=0)
    return ((unit - mean) / std.clamp_min(_MIN_STD)).to(unit.dtype)


def preprocess(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Decoded (H, W) float image in [0, 1] -> model input (1, S, S) float32."""
    resized = resize_square(pixels, config.image_size)
    return standardise(resized, config)[None, :, :].astype(np.float32, copy=False)


def preprocess_tensor(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """:func:`preprocess` for an (H, W) float tensor on any device (GPU decode): (1, S, S) float32 there.

    ``antialias=True`` makes torch's bilinear resize Pillow's (within :data:`RESIZE_ATOL`), so a
    GPU-decoded image enters the model as the CPU path's would.
    """
    size = config.image_size
    x = pixels.to(torch.float32)[None, None]
    if tuple(pixels.shape) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return standardise(x[0], config)
