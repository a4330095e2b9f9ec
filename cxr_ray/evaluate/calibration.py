"""Temperature scaling and the expected calibration error.

A network trained with label smoothing, mixup and class weights gives scores
that rank well but do not read as probabilities: "0.9 covid" is not right
nine times in ten. Temperature scaling (Guo et al. 2017, "On calibration of
modern neural networks") divides the logits by one scalar ``T`` fitted on
VALIDATION data by minimising the negative log-likelihood. It keeps the
arg-max (so accuracy and AUC are unchanged) and only moves the confidence.

The fitted ``T`` goes into ``model.json`` (``calibration``) and
:meth:`cxr_ray.models.card.ModelCard.decide` applies it
(:func:`cxr_ray.models.calibration.temperature_scale`) to every engine's
output, so screen, serve and evaluate give the same calibrated probabilities;
a fold ensemble applies each member's temperature inside its graph.

ECE follows Guo et al.: top-label confidence in ``n_bins`` equal-width bins,
``sum_b |acc_b - conf_b| * n_b / n``. Plain numpy/scipy, no torch.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

ECE_BINS = 15
# log T is searched in this range: T from about 0.05 (sharpen) to 20 (flatten)
_LOG_T_BOUNDS = (-3.0, 3.0)


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant, which softmax ignores) of probabilities."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-30, 1.0))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)`` (of probabilities: ``temperature_scale``)."""
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    log_p = log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` on these (validation) cases.

    A bounded 1-D search over ``log T`` (the NLL is convex in ``1/T``, so the
    minimum is unique); ``T = 1`` when there are too few cases to fit on.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be (n, K) with one label per row, got {logits.shape} and {labels.shape}")
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return 1.0
    result = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per-bin top-label confidence, accuracy and count, and the ECE they give.

    Bins are ``(i/n, (i+1)/n]`` (the first also holds 0); empty bins have
    ``None`` confidence and accuracy.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(probs) == 0:
        raise ValueError("no cases to measure calibration on")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    filled = counts > 0
    mean_conf = np.where(filled, conf_sum / np.maximum(counts, 1), np.nan)
    mean_acc = np.where(filled, acc_sum / np.maximum(counts, 1), np.nan)
    ece = float(np.sum(np.abs(mean_acc - mean_conf)[filled] * counts[filled]) / len(probs))
    return {
        "ece": ece,
        "n_bins": int(n_bins),
        "edges": edges.tolist(),
        "confidence": [None if not f else float(v) for f, v in zip(filled, mean_conf, strict=True)],
        "accuracy": [None if not f else float(v) for f, v in zip(filled, mean_acc, strict=True)],
        "count": counts.astype(int).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE in ``n_bins`` equal-width bins (Guo et al. 2017)."""
    return reliability(probs, labels, n_bins)["ece"]


def calibration_record(val_probs: np.ndarray, val_labels: np.ndarray) -> dict:
    """Fit ``T`` on validation probabilities (their logits); the ``calibration`` record of ``model.json``.

    Holds the temperature and the validation ECE before and after, so a
    reader of the card sees what calibration changed on the data it was fitted on.
    """
    val_logits = logits_from_probs(val_probs)
    temperature = fit_temperature(val_logits, val_labels)
    return {
        "method": "temperature",
        "temperature": temperature,
        "fitted_on": "validation",
        "n": int(len(val_labels)),
        "val_ece_before": expected_calibration_error(apply_temperature(val_logits, 1.0), val_labels),
        "val_ece_after": expected_calibration_error(apply_temperature(val_logits, temperature), val_labels),
        "ece_bins": ECE_BINS,
    }
