"""Wire format of the HTTP endpoint: response models, error envelope, content types.

Every non-2xx answer is ``{"error": {"code": ..., "message": ...}}``. Codes are
stable: the decode codes of :mod:`cxr_ray.errors` for 422, and the HTTP-level
codes below for the rest. Messages never carry patient data.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

# HTTP-level error codes (422 answers use the decoder's codes instead).
ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
    500: "internal",
    503: "overloaded",
}

# Content types taken as the image itself, by the format they announce.
IMAGE_TYPES = {
    "application/dicom": "dicom",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",  # common misspelling; harmless to accept
}
# Content types that say nothing about the format: sniff the bytes instead.
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "*/*"})
MULTIPART_TYPE = "multipart/form-data"
ACCEPTED_TYPES = sorted({*IMAGE_TYPES, "application/octet-stream", MULTIPART_TYPE})


class ExplainMethod(str, Enum):
    gradcam = "gradcam"
    lrp = "lrp"


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. lateral_view, too_large")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str
    version: str
    arch: str
    backend: str


class Timing(BaseModel):
    read_ms: float = Field(description="receiving the body through Serve's proxy")
    decode_ms: float = Field(description="decode + preprocess, in the ingress")
    model_ms: float = Field(description="the backend call for the whole batch")
    total_ms: float


class PredictResponse(BaseModel):
    request_id: str
    label: str = Field(description="class with the highest probability")
    probabilities: dict[str, float]
    score: float | None = Field(description="probability of the positive class (None: card has none)")
    flagged: bool | None = Field(description="score >= threshold")
    threshold: float
    positive_class: str | None
    model: ModelRef
    format: str = Field(description="dicom | png | jpeg, recognised from the content")
    modality: str | None = None
    view: str | None = Field(None, description="DICOM ViewPosition (PA / AP) when present")
    rows: int
    cols: int
    warnings: list[str] = Field(default_factory=list)
    batch_size: int = Field(description="size of the model batch this image was predicted in")
    timing: Timing
    explain_method: ExplainMethod | None = None
    heatmap_png_base64: str | None = Field(None, description="PNG overlay, with ?explain=")


class HealthResponse(BaseModel):
    status: str
    model: ModelRef


class ModelInfo(BaseModel):
    """The model card served by ``GET /v1/model`` (training internals trimmed)."""

    name: str
    version: str
    arch: str
    classes: list[str]
    positive_class: str | None
    threshold: float
    thresholds: dict
    image_size: int
    preprocessing: dict
    metrics: dict
    training: dict = Field(description="scalar training settings only; nested records left out")
    data_fingerprint: str | None
    created_at: str
    schema_version: int
    backend: str
    verification: dict | None = Field(None, description="the engine's load-time check against ONNX Runtime fp32 "
                                      "(OpenVINO: max_abs_diff, atol, real_images, auc), null where none ran")
    batching: dict
    explain_methods: list[str]


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def media_type(content_type: str | None) -> str:
    """``image/PNG; charset=x`` -> ``image/png``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def card_summary(card: dict) -> dict:
    """``model.json`` minus training internals: keep scalar training settings only."""
    training = {k: v for k, v in dict(card.get("training") or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
    keep = (
        "name", "version", "arch", "classes", "positive_class", "thresholds", "preprocessing",
        "metrics", "data_fingerprint", "created_at", "schema_version",
    )
    out = {k: card.get(k) for k in keep}
    out["training"] = training
    out["thresholds"] = out["thresholds"] or {}
    out["metrics"] = out["metrics"] or {}
    out["image_size"] = int(card["preprocessing"]["image_size"])
    out["threshold"] = float(out["thresholds"].get("positive", 0.5))  # type: ignore[union-attr]
    return out
