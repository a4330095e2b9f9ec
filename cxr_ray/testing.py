"""What the tests share with each other and the benchmarks: tiny real artifacts, thread limits.

Real parts, not mocks: a "tiny artifact" is a real network of a registered
architecture (random weights, fixed seed) saved as a real artifact, with a
real ONNX export when asked. ``tests/conftest.py`` wraps these in fixtures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_ray.bench.artifacts import BENCH_CLASSES
from cxr_ray.engines.onnxruntime.build import export_onnx
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import ThresholdsRecord, new_card

__all__ = ["CLASSES", "IMAGE_SIZE", "make_artifact", "seeded_model", "torch_threads"]

CLASSES = list(BENCH_CLASSES)  # the phantom's classes, in the order every test model uses
IMAGE_SIZE = 64


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block: on a shared 2-core box, one thread is
    several times faster than two fighting other processes for the cores (and gives repeatable weights)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def seeded_model(arch: str = "mobilenet_v2", classes: list[str] | None = None, *, seed: int = 0,
                 calibrate_bn_at: int | None = None) -> nn.Module:
    """A random-weight ``arch`` (eval mode); ``calibrate_bn_at``: BatchNorm statistics estimated on a
    few random batches of that size first, so different images get different probabilities (with
    the initial statistics ReLU6 saturates and every image gets the same answer)."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes or CLASSES))
    if calibrate_bn_at is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, 1, calibrate_bn_at, calibrate_bn_at) * 0.5)
    return model.eval()


def make_artifact(
    directory: str | os.PathLike,
    *,
    arch: str = "mobilenet_v2",
    classes: list[str] | None = None,
    image_size: int | None = IMAGE_SIZE,
    name: str = "test",
    seed: int = 0,
    positive_class: str | None = None,
    thresholds: ThresholdsRecord | dict[str, Any] | None = None,
    onnx: bool = False,
    calibrate_bn: bool = False,
    model: nn.Module | None = None,
    card_fields: dict[str, Any] | None = None,
) -> Path:
    """A real artifact in ``directory``: ``model`` or a seeded random ``arch``, with an ONNX export
    (as ``cxr-ray export`` writes it) when ``onnx``. ``card_fields`` go into the card as they are
    (``calibration``, ``ensemble``)."""
    classes = list(classes or CLASSES)
    if model is None:
        model = seeded_model(arch, classes, seed=seed, calibrate_bn_at=image_size if calibrate_bn else None)
    card = new_card(name=name, arch=arch, classes=classes, image_size=image_size, positive_class=positive_class,
                    thresholds=dict(thresholds or {}), **(card_fields or {}))
    save_artifact(directory, model.eval(), card)
    if onnx:
        with torch_threads(1):
            export_onnx(directory)
    return Path(directory)
