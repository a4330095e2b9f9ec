"""The model card (``model.json``): what a model is, how to feed it, and how its outputs are read.

``ModelCard.decide(probs)`` is THE rule from class probabilities to a decision
(predicted label, positive-class score, flagged): screening rows, HTTP answers
and evaluation predictions all call it, so the three surfaces can never
disagree. Temperature calibration (fitted on validation data at training
time) is :meth:`ModelCard.calibrate`, which ``decide`` applies first; callers
write out ``Decisions.probabilities`` (the calibrated ones), never their own
input. A fold ensemble calibrates each member inside its graph
(:class:`cxr_ray.models.ensemble.FoldEnsemble`), so its card temperature is 1.

The TypedDicts name the parts of ``model.json`` that other modules read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from cxr_ray.errors import ArtifactError
from cxr_ray.models.calibration import temperature_scale
from cxr_ray.models.registry import get_arch
from cxr_ray.preprocess import PreprocessConfig

SCHEMA_VERSION = 1
DEFAULT_THRESHOLD = 0.5  # when no operating point was chosen on validation data


class _PreprocessingBase(TypedDict):
    image_size: int
    mean: float
    std: float


class PreprocessingRecord(_PreprocessingBase, total=False):
    normalization: str  # "fixed" (absent in older cards) | "per_image"


class CalibrationRecord(TypedDict, total=False):
    method: str  # "temperature"
    temperature: float  # applied by ModelCard.calibrate (1.0 for ensembles: members are calibrated inside)
    fitted_on: str
    n: int
    val_ece_before: float
    val_ece_after: float
    ece_bins: int
    per_fold: list[float]  # ensembles: each member's temperature (inside the graph)


class EnsembleRecord(TypedDict, total=False):
    members: int  # the artifact's network is the mean of this many fold models' calibrated probabilities
    temperatures: list[float]
    combine: str  # "mean of calibrated member probabilities"
    trained_on: str


class ThresholdsRecord(TypedDict, total=False):
    positive: float
    target_sensitivity: float
    chosen_on: str  # "validation" | "default"
    val_sensitivity: float
    val_specificity: float
    n_positive: int
    n_negative: int
    method: str
    per_fold: list[float]
    note: str


class OnnxRecord(TypedDict, total=False):
    file: str
    sha256: str
    opset: int
    max_abs_diff: float | None
    atol: float | None
    verified_batch_sizes: list[int]
    exported_at: str
    input: str
    input_shape: list[Any]
    output: str
    output_shape: list[Any]
    image_size: int
    model_version: str
    exporter: str
    torch_version: str


class EngineRecord(TypedDict, total=False):
    file: str
    key: str
    sha256: str
    bytes: int
    onnx_sha256: str | None
    built_at: str
    precision: str
    trt_version: str
    max_abs_diff: float
    atol: float


@dataclass(frozen=True)
class Decisions:
    """What ``decide`` makes of a batch of N rows of K class probabilities."""

    probabilities: np.ndarray  # (N, K) float32: what outputs record (calibrated, once calibration exists)
    predicted_index: np.ndarray  # (N,) arg-max class
    labels: list[str]  # (N,) class names of ``predicted_index``
    scores: np.ndarray | None  # (N,) positive-class probability; None without a positive class
    flagged: np.ndarray | None  # (N,) ``scores >= threshold``; None without a positive class


@dataclass
class ModelCard:
    """Contents of ``model.json``."""

    name: str
    arch: str
    classes: list[str]
    preprocessing: PreprocessingRecord
    positive_class: str | None = None
    thresholds: ThresholdsRecord = field(default_factory=lambda: ThresholdsRecord())
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    # What validation data looked like (score histogram, header mix): cxr_ray.models.fingerprint.
    drift_fingerprint: dict[str, Any] | None = None
    version: str = ""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    onnx: OnnxRecord | None = None
    engines: list[EngineRecord] = field(default_factory=list)
    calibration: CalibrationRecord | None = None
    ensemble: EnsembleRecord | None = None
    reference: dict[str, Any] | None = None  # training-data fingerprint for drift checks (validation data)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(dict(self.preprocessing))

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    @property
    def threshold(self) -> float:
        """Operating threshold on the positive-class score (0.5 when none was chosen)."""
        return float(self.thresholds.get("positive", DEFAULT_THRESHOLD))

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class in self.classes else None

    @property
    def temperature(self) -> float:
        """The card-level calibration temperature (1.0: none, or applied inside an ensemble's graph)."""
        record = self.calibration or {}
        return float(record.get("temperature", 1.0)) if record.get("method") == "temperature" else 1.0

    # ------------------------------------------------------------------ the decision rule
    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """The probabilities every output reports: ``softmax(log(p) / T)`` (= softmax(logits / T)).

        Engines output softmax probabilities; ``log p`` differs from the logits by
        a per-row constant, which softmax ignores, so scaling here equals scaling
        the logits. NaN rows (inputs that never reached the model) stay NaN.
        """
        return temperature_scale(probs, self.temperature)

    def decide(self, probs: np.ndarray) -> Decisions:
        """Probabilities (N, K) -> predicted label, positive-class score and ``score >= threshold``.

        Rows of NaN (inputs that never reached the model) get label index 0 and
        ``flagged`` False; callers mask them out.
        """
        probs = self.calibrate(np.asarray(probs, dtype=np.float32).reshape(-1, len(self.classes)))
        predicted = np.nan_to_num(probs).argmax(axis=1)
        scores = flagged = None
        if self.positive_index is not None:
            scores = probs[:, self.positive_index]
            flagged = np.nan_to_num(scores, nan=-1.0) >= self.threshold
        return Decisions(
            probabilities=probs,
            predicted_index=predicted,
            labels=[self.classes[int(k)] for k in predicted],
            scores=scores,
            flagged=flagged,
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        data = asdict(self)
        data["image_size"] = self.image_size  # convenience for readers of the card
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if int(data.get("schema_version", 0)) != SCHEMA_VERSION:
            raise ArtifactError(
                f"model.json schema_version {data.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def new_card(
    *,
    name: str,
    arch: str,
    classes: list[str],
    image_size: int | None = None,
    positive_class: str | None = None,
    normalization: str = "fixed",
    **fields: Any,
) -> ModelCard:
    """A card whose preprocessing is derived from the architecture (never re-typed by callers)."""
    spec = get_arch(arch)
    size = int(image_size or spec.default_image_size)
    if size < spec.min_image_size:
        raise ValueError(f"{arch} needs image_size >= {spec.min_image_size}, got {size}")
    if positive_class is not None and positive_class not in classes:
        raise ValueError(f"positive class {positive_class!r} is not one of {classes}")
    config = PreprocessConfig(image_size=size, mean=spec.grey_mean, std=spec.grey_std, normalization=normalization)
    preprocessing = PreprocessingRecord(image_size=config.image_size, mean=config.mean, std=config.std)
    if normalization != "fixed":  # older readers and versions: "fixed" is what an absent key means
        preprocessing["normalization"] = normalization
    return ModelCard(
        name=name, arch=arch, classes=list(classes), preprocessing=preprocessing, positive_class=positive_class, **fields
    )
