"""From cached unit images to network inputs: augmentation, MixUp/CutMix, standardisation.

The training cache holds resized unit images (see :mod:`cxr_ray.train.ingest`).
Training batches are augmented, optionally mixed (soft targets), then
standardised with the artifact's own :func:`cxr_ray.preprocess.standardise`;
evaluation batches are only standardised, which makes them exactly what
``preprocess`` gives screening and serving for the same film.
"""

from __future__ import annotations

from typing import Any

import torch

from cxr_ray.data.augment import AugmentConfig, RadiographAugment, mixing
from cxr_ray.preprocess import PreprocessConfig, standardise


class BatchPreparer:
    """``train(images, labels) -> (inputs, targets)`` and ``evaluate(images) -> inputs``."""

    def __init__(self, preprocessing: dict[str, Any], augment: dict[str, Any] | None, *, num_classes: int,
                 mixup: float = 0.0, cutmix: float = 0.0) -> None:
        self.config = PreprocessConfig.from_dict(preprocessing)
        config = AugmentConfig.from_dict(augment)
        self.augment = RadiographAugment(config) if augment is not None and config.enabled else None
        self.mix = mixing(num_classes, mixup, cutmix)

    def train(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, mixed and standardised inputs; targets are class indices, or (N, K) soft targets when mixed."""
        if self.augment is not None:
            images = self.augment(images)
        targets = labels
        if self.mix is not None and len(images) > 1:
            images, targets = self.mix(images, labels)
        return standardise(images.float(), self.config), targets

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        return standardise(images.float(), self.config)
