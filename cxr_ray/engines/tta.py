"""Test-time augmentation: the mean probability over N fixed views of each image, around any engine.

``--tta N`` (evaluate, screen, serve) replaces each preprocessed image by N
deterministic views — the image itself, then slightly zoomed-in crops (90%
of the side: centred, then shifted towards each corner; then 85% centred) —
runs the wrapped engine once on all of them and averages the probabilities.
The views only crop and rescale inside the film (no padding, no flips: a
flipped chest is anatomically another one), so every engine and precision
sees inputs of the same kind it was verified on. Deterministic views keep the
outputs reproducible: the same file gives the same row on every run.

The cost is N model passes per image; the gain is measured, not assumed
(``cxr-ray evaluate --tta N`` reports it on a labelled set).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray.engines.base import Backend
from cxr_ray.errors import UsageError

# (side fraction, x shift, y shift) in affine_grid units: a 0.9 crop can move 0.1 before leaving the film
VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.9, 0.0, 0.0),
    (0.9, -0.1, -0.1),
    (0.9, 0.1, -0.1),
    (0.9, -0.1, 0.1),
    (0.9, 0.1, 0.1),
    (0.85, 0.0, 0.0),
    (0.95, 0.0, 0.0),
)
MAX_VIEWS = len(VIEWS)


class TTAViewsError(UsageError, ValueError):
    """A number of test-time views outside 1..MAX_VIEWS."""


def check_views(n: int) -> int:
    if not 1 <= int(n) <= MAX_VIEWS:
        raise TTAViewsError(f"--tta {n}: between 1 (off) and {MAX_VIEWS} views")
    return int(n)


def views(batch: np.ndarray, n: int) -> np.ndarray:
    """(B, C, S, S) -> (B * n, C, S, S): each image's n views, consecutive."""
    check_views(n)
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    count = len(x)
    theta = torch.zeros(n, 2, 3)
    for i, (scale, dx, dy) in enumerate(VIEWS[:n]):
        theta[i, 0, 0] = theta[i, 1, 1] = scale
        theta[i, 0, 2], theta[i, 1, 2] = dx, dy
    theta = theta.repeat(count, 1, 1)  # image-major: image 0's views, then image 1's...
    repeated = x.repeat_interleave(n, dim=0)
    grid = F.affine_grid(theta, list(repeated.shape), align_corners=False)
    out = F.grid_sample(repeated, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out[::n] = x  # view 0 is the image itself, bit for bit
    return out.numpy()


class TTABackend(Backend):
    """``inner`` run on ``n`` views of every image; the probabilities are averaged per image."""

    def __init__(self, inner: Backend, n: int) -> None:
        self.inner = inner
        self.n = check_views(n)
        self.name = inner.name
        self.input_spec = inner.input_spec
        self.classes = inner.classes
        self.precision = getattr(inner, "precision", None)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        probs = self.inner.predict(views(batch, self.n))
        return probs.reshape(len(batch), self.n, -1).mean(axis=1).astype(np.float32)

    @property
    def label(self) -> str:
        return f"{self.inner.label}-tta{self.n}"

    def describe(self) -> dict:
        return {**self.inner.describe(), "tta_views": self.n}
