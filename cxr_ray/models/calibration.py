"""Applying a fitted temperature to class probabilities (the fit itself: :mod:`cxr_ray.evaluate.calibration`).

Engines output softmax probabilities. ``log p`` differs from the logits by a
per-row constant, which softmax ignores, so ``softmax(log(p) / T)`` is exactly
``softmax(logits / T)``: calibration can be applied to any engine's output
without touching its graph. Plain numpy.
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-30  # a probability that underflowed to 0 stays (almost) 0, and log stays finite


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` row-wise, float32; NaN rows stay NaN; ``T = 1`` returns ``probs``."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, None)) / float(temperature)
    with np.errstate(invalid="ignore"):
        logits -= np.max(logits, axis=1, keepdims=True)
        scaled = np.exp(logits)
        return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)
