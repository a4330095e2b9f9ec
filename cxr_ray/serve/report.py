"""``POST /v1/predict`` with ``Accept: application/dicom``: the result as a DICOM Comprehensive SR.

The SR is the one ``cxr-ray screen --dicom-results`` writes (:func:`cxr_ray.dicomnet.results.sr_for`,
TID 1500), built from the same prediction the JSON answer reports, and returned as Part-10 bytes.
It copies the patient's identifiers from the request's own header, because a PACS files the SR by
them; nothing else the endpoint answers or logs carries them (README "Patient identifiers").

Rules (README "HTTP API"):

* DICOM is answered only when ``Accept`` names ``application/dicom`` and prefers it to
  ``application/json``; anything else (no header, ``*/*``, a tie) keeps the JSON answer;
* only a DICOM input has the header an SR is filed under: PNG / JPEG inputs get 406 ``not_acceptable``;
* ``?explain=`` is refused (400): the SR has no room for a heatmap, and dropping the request's
  explicit ask silently would be worse than saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_ray.dicomnet.results import part10, sr_for

DICOM_TYPE = "application/dicom"
JSON_TYPE = "application/json"
# OpenAPI for the 200 answer: FastAPI adds the JSON schema (the response model) next to this.
SR_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {DICOM_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "the result as JSON, or with `Accept: application/dicom` (DICOM input) as a Comprehensive SR",
    }
}


class SrUnavailable(Exception):
    """The input decoded, but its header lacks what an SR needs (a UID, say); the message names no patient."""


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0  # a malformed weight counts as "not acceptable", never a 500
    return 1.0


def wants_dicom(accept: str | None) -> bool:
    """True when ``accept`` names ``application/dicom`` with a weight above that of ``application/json``.

    Only explicit names count: wildcards (``*/*``, ``application/*``) say nothing about DICOM,
    so clients that send them (curl, browsers, httpx) keep today's JSON answer.
    """
    weights: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media in (DICOM_TYPE, JSON_TYPE):
            weights[media] = max(weights.get(media, 0.0), _quality(params))
    return weights.get(DICOM_TYPE, 0.0) > max(0.0, weights.get(JSON_TYPE, 0.0))


def sr_bytes(data: bytes, info: Mapping[str, Any], result: Mapping[str, Any]) -> bytes:
    """Part-10 bytes of the SR for one prediction on the DICOM ``data`` (runs in a worker thread).

    ``info``: the model card summary (name, version, threshold); ``result``: the model stage's answer
    (label, score, flagged), the values the JSON answer reports.
    """
    row = {
        "predicted_label": result["label"],
        "score": result["score"],
        "flagged": result["flagged"],
        "threshold": info["threshold"],
        "model_name": info["name"],
        "model_version": info["version"],
    }
    try:
        return part10(sr_for(data, row))
    except Exception as exc:  # noqa: BLE001 - a header highdicom refuses is this request's problem only
        # The type only: highdicom's and pydicom's messages can quote header values (PHI).
        raise SrUnavailable(f"the DICOM header lacks what a structured report needs ({type(exc).__name__})") from None
