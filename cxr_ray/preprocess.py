"""The one preprocessing function every surface applies (train, screen, serve, explain).

Its parameters live in ``model.json`` so an artifact always brings its own
preprocessing: the decoded [0, 1] grey image is resized to a square of
``image_size`` and standardised with a single mean/std. Models take ONE input
channel: pretrained RGB first-layer kernels are summed at build time (timm's
``adapt_input_conv``), so no work is spent copying grey into three channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    mean: float = IMAGENET_GREY_MEAN
    std: float = IMAGENET_GREY_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        return cls(image_size=int(data["image_size"]), mean=float(data["mean"]), std=float(data["std"]))


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 (H, W) image to (size, size) with an antialiased bilinear filter."""
    if pixels.shape == (size, size):
        return pixels.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def preprocess(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Decoded (H, W) float image in [0, 1] -> model input (1, S, S) float32."""
    resized = resize_square(pixels, config.image_size)
    return ((resized - config.mean) / config.std)[None, :, :].astype(np.float32, copy=False)


def preprocess_tensor(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """:func:`preprocess` for an (H, W) float tensor on any device (GPU decode): (1, S, S) float32 there.

    ``antialias=True`` makes torch's bilinear resize Pillow's (within :data:`RESIZE_ATOL`), so a
    GPU-decoded image enters the model as the CPU path's would.
    """
    size = config.image_size
    x = pixels.to(torch.float32)[None, None]
    if tuple(pixels.shape) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x[0] - config.mean) / config.std
