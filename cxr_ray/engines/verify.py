"""An engine checked against a reference engine when it loads: probabilities, and AUC on labelled images.

For the engines whose numbers are not fp32 PyTorch's by construction (OpenVINO,
whose CPU kernels and reduced precisions differ from ONNX Runtime's): the
reference is ONNX Runtime fp32 on the same graph, itself verified against
eager PyTorch when the graph was exported. Two checks, both on the same inputs
for both engines:

* the largest |probability difference| on the contract's sample batches
  (:func:`~cxr_ray.engines.contract.sample_inputs`) and, when a labelled set is
  given, on a seeded sample of its real images, against the engine's tolerance;
* with a labelled set, the change in ROC AUC (positive class vs the rest, or
  one-vs-rest macro without a positive class), against :data:`AUC_TOLERANCE`.

A failed check is an :class:`EngineVerificationError`, a
:class:`~cxr_ray.errors.BackendUnavailableError`: ``--backend auto`` passes
over the engine to the next one (:mod:`cxr_ray.engines.load`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_ray.data.labelled import decode_batch, read_labelled
from cxr_ray.engines.base import Backend
from cxr_ray.engines.contract import max_abs_diff_vs_fp32
from cxr_ray.errors import BackendUnavailableError, UsageError
from cxr_ray.models.card import ModelCard
from cxr_ray.preprocess import PreprocessConfig, standardise

AUC_TOLERANCE = 0.005  # largest accepted |AUC(engine) - AUC(reference)| on a labelled sample
DEFAULT_VERIFY_IMAGES = 256
PREDICT_CHUNK = 32


class EngineVerificationError(BackendUnavailableError):
    """The engine's outputs differ from the reference engine's beyond the accepted limits."""


@dataclass(frozen=True)
class LabelledSample:
    """Preprocessed images (n, 1, S, S) and their class indices, from a labelled set (labels None:
    real images without labels, e.g. an int8 engine's calibration sample: no AUC then)."""

    images: np.ndarray
    labels: np.ndarray | None
    spec: str
    skipped: int = 0


def labelled_sample(spec: str, card: ModelCard, *, limit: int = DEFAULT_VERIFY_IMAGES, seed: int = 0,
                    s3_endpoint: str | None = None) -> LabelledSample:
    """A seeded sample of ``limit`` images of a labelled set (manifest or folder tree, the card's classes),
    decoded and preprocessed as every surface does; undecodable files are skipped and counted."""
    frame = read_labelled(spec, s3_endpoint=s3_endpoint, classes=card.classes).frame
    rows = sorted(random.Random(seed).sample(range(len(frame)), min(limit, len(frame))))
    frame = frame.iloc[rows]
    batch = {
        "row_id": np.arange(len(frame)),
        "path": frame["path"].to_numpy(),
        "label": np.array([card.classes.index(label) for label in frame["label"]]),
    }
    decoded = decode_batch(batch, preprocessing=dict(card.preprocessing), s3_endpoint=s3_endpoint)
    ok = decoded["status"] == "ok"
    if not ok.any():
        raise UsageError(f"verification set {spec!r}: none of {len(frame)} sampled files could be decoded")
    # decode_batch gives unit images (training caches them and standardises after augmentation);
    # an engine takes what every surface feeds it: the standardised image
    images = standardise(decoded["image"][ok], PreprocessConfig.from_dict(dict(card.preprocessing)))
    return LabelledSample(images, decoded["label"][ok], spec, skipped=int((~ok).sum()))


def predict_all(backend: Backend, images: np.ndarray) -> np.ndarray:
    return np.concatenate([backend.predict(images[i : i + PREDICT_CHUNK]) for i in range(0, len(images), PREDICT_CHUNK)])


def auc(probs: np.ndarray, labels: np.ndarray, positive: int | None) -> float | None:
    """ROC AUC of ``positive`` vs the rest (one-vs-rest macro when None); None where a class is missing."""
    if positive is not None:
        truth = labels == positive
        return float(roc_auc_score(truth, probs[:, positive])) if 0 < truth.sum() < len(truth) else None
    if len(np.unique(labels)) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


def verify_against(candidate: Backend, reference: Backend, card: ModelCard, *, atol: float,
                   sample: LabelledSample | None = None, synthetic: bool = True,
                   auc_tolerance: float = AUC_TOLERANCE, expected: np.ndarray | None = None) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` (see the module docstring); the report, or
    :class:`EngineVerificationError` naming the figure that failed. ``synthetic`` False: real images
    only (an int8 engine is calibrated on real images, and noise batches lie outside its ranges).
    ``expected``: ``reference``'s predictions on ``sample`` when the caller has them already (one
    reference run for several candidates)."""
    what = f"{candidate.label} vs {reference.label}"
    diff = 0.0
    if synthetic:
        diff = max_abs_diff_vs_fp32(candidate.predict, reference.predict, card.image_size, what=what)
    report: dict[str, Any] = {"reference": reference.label, "max_abs_diff": diff, "atol": atol}
    if sample is not None:
        got = predict_all(candidate, sample.images)
        expected = predict_all(reference, sample.images) if expected is None else expected
        report["max_abs_diff_real"] = float(np.max(np.abs(got - expected)))
        report["real_images"] = {"spec": sample.spec, "images": len(got)}
        diff = report["max_abs_diff"] = max(diff, report["max_abs_diff_real"])
    if sample is not None and sample.labels is not None:
        assert expected is not None  # set above with the sample
        engine_auc, reference_auc = (auc(p, sample.labels, card.positive_index) for p in (got, expected))
        report["auc"] = {"images": len(sample.labels), "skipped": sample.skipped, "engine": engine_auc,
                         "reference": reference_auc, "limit": auc_tolerance,
                         "change": None if engine_auc is None or reference_auc is None else engine_auc - reference_auc}
    if diff > atol:
        raise EngineVerificationError(f"{what}: probabilities differ by up to {diff:.3g} (> {atol:.3g})")
    change = report.get("auc", {}).get("change")
    if change is not None and abs(change) > auc_tolerance:
        raise EngineVerificationError(f"{what}: AUC changes by {change:+.4f} on {sample.spec if sample else ''} "
                                      f"(limit {auc_tolerance})")
    return report
