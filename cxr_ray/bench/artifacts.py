"""Random-weight artifacts for the benchmarks, without Ray (``cxr-ray bench gpu`` runs where Ray is not)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card

BENCH_CLASSES = ["covid", "normal", "pneumonia"]


def random_artifact(directory: str | os.PathLike, arch: str, image_size: int | None = None, *,
                    positive_class: str | None = "covid", seed: int = 0) -> str:
    """A seeded random-weight artifact of ``arch``: the same version every run (speed does not depend
    on the weights, and a cached ONNX export is found again)."""
    torch.manual_seed(seed)
    card = new_card(name=f"bench-{arch}", arch=arch, classes=BENCH_CLASSES, image_size=image_size,
                    positive_class=positive_class)
    save_artifact(Path(directory), build_model(arch, len(BENCH_CLASSES)).eval(), card)
    return str(directory)
