"""Training-time augmentation fit for chest radiographs, batched on tensors.

What differs between two acquisitions of the same kind of film: framing
(collimation, patient position: a random resized crop that keeps most of the
chest, or a slightly wider field), small rotations and shifts, and exposure
(brightness, contrast, gamma). No horizontal flip by default: the heart sits
on the patient's left, and a flipped film is an anatomically different
(situs inversus) image that also destroys the side markers some findings
depend on. No vertical flips or colour transforms.

Augmentation runs on the training workers on batches of *unit* images (the
cached output of :func:`cxr_ray.preprocess.resize_square`, in [0, 1]); the
loop then applies :func:`cxr_ray.preprocess.standardise`, so validation /
test / serving inputs are exactly ``preprocess`` and training inputs differ
only by the augmentation.

Every image draws its own parameters, but the geometry of the whole batch is
ONE ``affine_grid`` + ``grid_sample`` (crop, zoom, rotation and shift
composed into one 2x3 matrix per image): a per-image torchvision pipeline
measured 4-6 ms per 128 px image, a third of a training step on two cores;
this costs well under 1 ms. Randomness comes from torch's global RNG, which
the training loop seeds per epoch (a resumed run draws the same).

:func:`mixing` is the batch-level MixUp / CutMix step (torchvision's), which
turns integer labels into soft targets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.85, 1.17)  # crop area / image area (> 1: zoom out, black border)
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # crop aspect ratio range (w / h), log-uniform
    rotation: float = 7.0  # degrees, +/-
    translate: float = 0.06  # fraction of the side, +/- (on top of where the crop lands)
    brightness: float = 0.15  # multiplicative, 1 +/- b
    contrast: float = 0.15  # around the image's mean, 1 +/- c
    gamma: float = 0.0  # exponent log-uniform in [exp(-g), exp(g)]; 0 = off
    hflip: bool = False  # off for radiographs (see module docstring)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["crop_scale"], out["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig:
        data = dict(data or {})
        for key in ("crop_scale", "crop_ratio"):
            if key in data:
                data[key] = tuple(data[key])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high) if high > low else torch.full((n,), float(low))


def affine_matrices(n: int, config: AugmentConfig, size: int = 2**16) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates ([-1, 1], ``affine_grid``'s convention).

    The crop has width ``sqrt(area * ratio)`` and height ``sqrt(area / ratio)``
    (fractions of the side); its centre lands anywhere that keeps a crop inside
    the film (or the film inside a zoomed-out crop), plus the shift. ``size``
    (pixels per side) keeps an inside crop's outermost samples on pixel
    centres, so bilinear sampling never blends in the black outside.
    """
    inner = 1 - 1 / size
    area = _uniform(n, *config.crop_scale)
    log_ratio = _uniform(n, math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    width, height = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    angle = _uniform(n, -config.rotation, config.rotation) * (math.pi / 180)
    centre_x = _uniform(n, -1, 1) * (1 - width).abs() * inner + _uniform(n, -1, 1) * 2 * config.translate
    centre_y = _uniform(n, -1, 1) * (1 - height).abs() * inner + _uniform(n, -1, 1) * 2 * config.translate
    if config.hflip:
        width = width * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([
        torch.stack([width * cos, -height * sin, centre_x], dim=1),
        torch.stack([width * sin, height * cos, centre_y], dim=1),
    ], dim=1)


def _factors(n: int, strength: float) -> torch.Tensor:
    return (1 + _uniform(n, -strength, strength)).view(n, 1, 1, 1)


class RadiographAugment:
    """Per-image random augmentation of a unit batch (N, 1, S, S) in [0, 1]; returns a new batch."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        c = config
        self._geometry = (tuple(c.crop_scale) != (1.0, 1.0) or tuple(c.crop_ratio) != (1.0, 1.0)
                          or bool(c.rotation or c.translate or c.hflip))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not c.enabled:
            return batch
        n = len(batch)
        out = batch.float()
        if self._geometry:
            grid = F.affine_grid(affine_matrices(n, c, int(out.shape[-1])), list(out.shape), align_corners=False)
            out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if c.gamma:
            out = out.clamp(0.0, 1.0) ** _uniform(n, -c.gamma, c.gamma).exp().view(n, 1, 1, 1)
        if c.contrast:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * _factors(n, c.contrast) + mean
        if c.brightness:
            out = out * _factors(n, c.brightness)
        return out.clamp_(0.0, 1.0) if out is not batch else out.clamp(0.0, 1.0)


def mixing(num_classes: int, mixup: float, cutmix: float) -> v2.Transform | None:
    """The batch-level MixUp / CutMix step (one of them per batch when both are on); None when both are 0.

    ``mixup`` / ``cutmix`` are the Beta(alpha, alpha) parameters. The step takes
    ``(images, int labels)`` and returns ``(images, soft targets (N, K))``.
    """
    steps: list[v2.Transform] = []
    if mixup > 0:
        steps.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        steps.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.RandomChoice(steps)
