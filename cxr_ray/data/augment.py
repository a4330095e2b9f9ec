"""Training-time augmentation fit for chest radiographs (torchvision.transforms.v2 on tensors).

Small geometric jitter (rotation, scale, translation) and exposure jitter
(brightness, contrast): what differs between two acquisitions of the same
kind of film. No horizontal flip by default: the heart sits on the patient's
left, and a flipped film is an anatomically different (situs inversus) image
that also destroys the side markers some findings depend on. No vertical
flips, crops that could cut the lung apices, or colour transforms.

Augmentation runs on the training workers on batches of *preprocessed*
tensors (the cached output of :func:`cxr_ray.preprocess.preprocess`): each
image is mapped back to [0, 1], transformed with its own random parameters,
clipped and standardised again, so validation / test / serving inputs are
exactly ``preprocess`` and training inputs differ only by the augmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import InterpolationMode, v2


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotation: float = 7.0  # degrees, +/-
    translate: float = 0.06  # fraction of the side, +/-
    scale: tuple[float, float] = (0.92, 1.08)
    brightness: float = 0.15  # multiplicative, 1 +/- b
    contrast: float = 0.15
    hflip: bool = False  # off for radiographs (see module docstring)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scale"] = list(self.scale)
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> AugmentConfig:
        data = dict(data or {})
        if "scale" in data:
            data["scale"] = tuple(data["scale"])
        return cls(**data)


class RadiographAugment:
    """Per-image random augmentation of a standardised batch (N, 1, S, S)."""

    def __init__(self, config: AugmentConfig, mean: float, std: float) -> None:
        self.config = config
        self.mean, self.std = float(mean), float(std)
        steps: list = []
        if config.rotation or config.translate or config.scale != (1.0, 1.0):
            steps.append(
                v2.RandomAffine(
                    degrees=config.rotation,
                    translate=(config.translate, config.translate) if config.translate else None,
                    scale=config.scale,
                    interpolation=InterpolationMode.BILINEAR,
                    fill=0.0,  # outside the film: no signal
                )
            )
        if config.brightness or config.contrast:
            steps.append(v2.ColorJitter(brightness=config.brightness or None, contrast=config.contrast or None))
        if config.hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.config.enabled or self.transform is None:
            return batch
        unit = batch * self.std + self.mean  # back to [0, 1]
        out = torch.stack([self.transform(image) for image in unit]).clamp_(0.0, 1.0)
        return (out - self.mean) / self.std
