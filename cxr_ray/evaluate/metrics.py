"""The metrics the source papers report, with bootstrap confidence intervals.

* :func:`classification_report`: multi-class accuracy, balanced accuracy,
  per-class sensitivity / specificity / PPV / NPV / F1 / one-vs-rest AUC, the
  confusion matrix, and (with ``positive_class``) the "positive class vs
  rest" binary report of Apostolopoulos et al. (covid vs rest) at a threshold.
* :func:`choose_threshold`: the operating point, chosen on VALIDATION data so
  test metrics are not flattered by a threshold tuned on the test set.
* :func:`summarize_folds`: mean ± sample std over cross-validation folds, the
  way the papers report k-fold results.

Every value is a plain ``float`` / ``int`` / ``list`` / ``None`` (undefined,
e.g. the AUC of a class absent from ``y_true``), so reports go straight into
``model.json`` and JSON output. A case is predicted as the arg-max class in the
multi-class report and as positive when its score is ``>= threshold`` in the
binary one (the same rule screening uses for ``flagged``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

CI_LEVEL = 0.95
_BOOTSTRAP_CHUNK = 2_000_000  # resample weights held at once (rows x cases), bounds memory
_NOT_METRICS = frozenset({"ci95", "confusion_matrix", "bootstrap", "counts", "classes"})


# --------------------------------------------------------------------------- helpers


def _num(value) -> float | None:
    """A JSON-safe float: NaN / inf (undefined) become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _as_indices(y_true, classes: Sequence[str]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.dtype.kind in "USO":  # class names
        lookup = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in y.tolist()} - set(lookup))
        if unknown:
            raise ValueError(f"y_true has labels {unknown} that are not in classes {list(classes)}")
        return np.array([lookup[str(v)] for v in y.tolist()], dtype=np.int64)
    if y.dtype.kind not in "iub" and y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y_true must hold class indices or class names")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"y_true indices must be in 0..{len(classes) - 1}, got {y.min()}..{y.max()}")
    return y


def _safe_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------- report


def classification_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    positive_class: str | None = None,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> dict:
    """Multi-class (and optional positive-vs-rest) metrics of ``probs`` (n, K) against ``y_true``.

    ``y_true`` holds class indices (or class names). 95% percentile-bootstrap
    intervals (``n_bootstrap`` resamples with replacement) are given for
    accuracy, balanced accuracy, macro AUC and the binary sensitivity,
    specificity and AUC; ``n_bootstrap=0`` skips them. With ``groups`` (one
    patient id per case) the resampled units are PATIENTS, each bringing all
    of its images (a cluster bootstrap): images of one patient are not
    independent, so resampling images would give intervals that are too narrow.
    """
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must have shape (n, {len(classes)}), got {probs.shape}")
    y = _as_indices(y_true, classes)
    if len(y) != len(probs):
        raise ValueError(f"y_true has {len(y)} cases but probs {len(probs)}")
    if len(y) == 0:
        raise ValueError("no cases to evaluate")
    n, k = probs.shape
    labels = np.arange(k)
    pred = probs.argmax(axis=1)

    cm = confusion_matrix(y, pred, labels=labels)
    per_class, aucs = _per_class(y, pred, probs, cm, classes)
    defined = [a for a in aucs if a is not None]
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": those classes are ignored, as intended
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, pred)
    report: dict = {
        "n": int(n),
        "classes": classes,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_auc": float(np.mean(defined)) if defined else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "matrix": cm.astype(int).tolist(), "rows": "true", "cols": "predicted"},
    }

    pos = None
    thr = 0.5 if threshold is None else float(threshold)
    if positive_class is not None:
        if positive_class not in classes:
            raise ValueError(f"positive class {positive_class!r} is not one of {classes}")
        pos = classes.index(positive_class)
        report["binary"] = _binary_report(y == pos, probs[:, pos], thr, positive_class)

    if n_bootstrap > 0:
        codes = None if groups is None else _group_codes(groups, n)
        _add_intervals(report, _bootstrap(y, probs, pred, pos, thr, n_bootstrap, seed, codes), pos is not None)
        report["bootstrap"] = {
            "n_resamples": int(n_bootstrap), "seed": int(seed), "method": "percentile", "level": CI_LEVEL,
            "unit": "case" if codes is None else "patient",
            "units": int(n if codes is None else codes.max() + 1),
        }
    return report


def _add_intervals(report: dict, samples: dict[str, np.ndarray], binary: bool) -> None:
    report["ci95"] = {name: _percentile_ci(samples[name]) for name in ("accuracy", "balanced_accuracy", "macro_auc")}
    if binary:
        report["binary"]["ci95"] = {
            name: _percentile_ci(samples[f"binary_{name}"]) for name in ("sensitivity", "specificity", "auc")
        }


def _per_class(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, cm: np.ndarray, classes: list[str]
               ) -> tuple[dict[str, dict[str, Any]], list[float | None]]:
    """Sensitivity, specificity, PPV, NPV, F1, one-vs-rest AUC and support per class; and the AUCs."""
    n, k = probs.shape
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(k), zero_division=np.nan
    )
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn
    aucs = [_safe_auc(y == i, probs[:, i]) for i in range(k)]
    per_class = {
        name: {
            "sensitivity": _num(recall[i]) if support[i] else None,
            "specificity": _ratio(tn[i], tn[i] + fp[i]),
            "ppv": _num(precision[i]),
            "npv": _ratio(tn[i], tn[i] + fn[i]),
            "f1": _num(f1[i]),
            "auc": aucs[i],
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return per_class, aucs


def _binary_report(positive: np.ndarray, score: np.ndarray, threshold: float, name: str) -> dict:
    flagged = score >= threshold
    tp = int(np.sum(flagged & positive))
    fp = int(np.sum(flagged & ~positive))
    fn = int(np.sum(~flagged & positive))
    tn = int(np.sum(~flagged & ~positive))
    return {
        "positive_class": name,
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(positive),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": _safe_auc(positive, score),
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


# --------------------------------------------------------------------------- bootstrap


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of case weights (B, n) at once (Mann-Whitney U, ties count 1/2).

    With weights of ones this equals ``roc_auc_score``; a bootstrap resample is
    the case multiplicities as weights. NaN where a resample lacks a class.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    is_pos = positive[order]
    pos_g = np.add.reduceat(w * is_pos, starts, axis=1)
    neg_g = np.add.reduceat(w * ~is_pos, starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    wins = np.sum(pos_g * (neg_below + 0.5 * neg_g), axis=1)
    pairs = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def _group_codes(groups: Sequence | np.ndarray, n: int) -> np.ndarray:
    """Cluster index 0..G-1 of every case, numbered in order of first appearance.

    That order makes the cluster bootstrap draw exactly what the case
    bootstrap draws (same seed) when every patient has one image.
    """
    codes, _ = pd.factorize(pd.Series(np.asarray(groups, dtype=object)).astype(str), sort=False)
    if len(codes) != n:
        raise ValueError(f"groups has {len(codes)} entries but there are {n} cases")
    return codes.astype(np.int64)


def _resample_weights(rng: np.random.Generator, rows: int, n: int, codes: np.ndarray | None) -> np.ndarray:
    """(rows, n) multiplicity of each case in ``rows`` resamples of cases (or of whole clusters)."""
    units = n if codes is None else int(codes.max()) + 1
    idx = rng.integers(0, units, size=(rows, units))
    flat = (idx + (np.arange(rows) * units)[:, None]).ravel()
    per_unit = np.bincount(flat, minlength=rows * units).reshape(rows, units).astype(np.float64)
    return per_unit if codes is None else per_unit[:, codes]


def _bootstrap(
    y: np.ndarray, probs: np.ndarray, pred: np.ndarray, pos: int | None, threshold: float, n_boot: int, seed: int,
    codes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Metric values on ``n_boot`` resamples, computed as weighted sums (no Python loop per resample).

    ``codes`` (cluster index per case) resamples clusters instead of cases.
    """
    rng = np.random.default_rng(seed)
    n, k = probs.shape
    onehot = np.eye(k)[y]  # (n, K)
    correct = (pred == y).astype(float)
    hits = onehot * correct[:, None]
    auc_classes = [i for i in range(k) if 0 < onehot[:, i].sum() < n]
    out: dict[str, list[np.ndarray]] = {
        name: [] for name in ("accuracy", "balanced_accuracy", "macro_auc",
                              "binary_sensitivity", "binary_specificity", "binary_auc")
    }
    chunk = max(1, min(n_boot, _BOOTSTRAP_CHUNK // n))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        w = _resample_weights(rng, rows, n, codes)
        # a cluster resample's size varies: normalise by its own total
        out["accuracy"].append(w @ correct / w.sum(axis=1))
        support = w @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, (w @ hits) / np.where(support > 0, support, 1), np.nan)
        out["balanced_accuracy"].append(np.nanmean(recall, axis=1))
        if auc_classes:
            per_class = np.stack([_weighted_auc(y == i, probs[:, i], w) for i in auc_classes], axis=1)
            all_nan = np.isnan(per_class).all(axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN, dropped later
                out["macro_auc"].append(np.where(all_nan, np.nan, np.nanmean(per_class, axis=1)))
        else:
            out["macro_auc"].append(np.full(rows, np.nan))
        if pos is not None:
            positive = y == pos
            flagged = probs[:, pos] >= threshold
            p_w, n_w = w @ positive, w @ ~positive
            with np.errstate(invalid="ignore", divide="ignore"):
                out["binary_sensitivity"].append(w @ (flagged & positive) / p_w)
                out["binary_specificity"].append(w @ (~flagged & ~positive) / n_w)
            out["binary_auc"].append(_weighted_auc(positive, probs[:, pos], w))
    return {name: np.concatenate(parts) if parts else np.array([]) for name, parts in out.items()}


def _percentile_ci(samples: np.ndarray) -> list[float] | None:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    alpha = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(finite, [alpha, 100 - alpha])
    return [float(low), float(high)]


# --------------------------------------------------------------------------- operating point


def choose_threshold(y_true_binary, scores, target_sensitivity: float = 0.95) -> dict:
    """The highest score threshold whose sensitivity on these (VALIDATION) cases is >= target.

    The result is the ``thresholds`` record of ``model.json``; a case is
    flagged when its score is ``>= positive``.
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    positive = np.asarray(y_true_binary).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != scores.shape:
        raise ValueError(f"{positive.size} labels but {scores.size} scores")
    if positive.all() or not positive.any():
        raise ValueError(
            "choosing a threshold needs both positive and negative validation cases "
            f"(got {int(positive.sum())} positive of {positive.size})"
        )
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    i = int(np.argmax(tpr >= target_sensitivity))  # tpr rises as the threshold falls; tpr[-1] == 1
    return {
        "positive": float(thresholds[i]),
        "target_sensitivity": float(target_sensitivity),
        "chosen_on": "validation",
        "val_sensitivity": float(tpr[i]),
        "val_specificity": float(1 - fpr[i]),
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
    }


# --------------------------------------------------------------------------- cross-validation


def _flatten(report: dict, prefix: str = "") -> dict[str, float | None]:
    flat: dict[str, float | None] = {}
    for key, value in report.items():
        if key in _NOT_METRICS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif value is None or (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)):
            flat[name] = _num(value)
    return flat


def summarize_folds(reports: list[dict]) -> dict:
    """Mean ± std over folds of every scalar metric of :func:`classification_report`.

    Nested metrics get dotted names (``per_class.covid.sensitivity``,
    ``binary.specificity``). ``std`` is the sample std (ddof=1) with two or
    more folds, 0.0 with one. Undefined values (None) are left out of a
    metric's mean; ``per_fold`` keeps them.
    """
    if not reports:
        raise ValueError("no fold reports to summarise")
    flats = [_flatten(r) for r in reports]
    names: list[str] = []
    for flat in flats:
        names.extend(name for name in flat if name not in names)
    metrics: dict[str, dict] = {}
    table = []
    for name in names:
        per_fold = [flat.get(name) for flat in flats]
        values = np.array([v for v in per_fold if v is not None], dtype=np.float64)
        mean = float(values.mean()) if values.size else None
        std = float(values.std(ddof=1)) if values.size >= 2 else (0.0 if values.size else None)
        metrics[name] = {"mean": mean, "std": std, "per_fold": per_fold}
        table.append({"metric": name, "mean": mean, "std": std, "per_fold": per_fold})
    return {"n_folds": len(reports), "metrics": metrics, "table": table}
