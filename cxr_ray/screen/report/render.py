"""Write ``OUTPUT/_report.html`` and its charts as ``OUTPUT/_report/*.png``.

The PNGs are also inlined (base64) in the HTML, so the one file stands alone
while the PNGs can go on a wiki or into a ticket. Both start with ``_``, so
Parquet readers of ``OUTPUT`` skip them.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from cxr_ray.evaluate.drift import (
    LABELS,
    MIN_IMAGES,
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    DriftResult,
    compare,
)
from cxr_ray.io.storage import open_output, read_bytes
from cxr_ray.models.card import ModelCard
from cxr_ray.models.fingerprint import HEADER_FIELDS
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.report import charts
from cxr_ray.screen.report.collect import FlaggedRow, ReportData, collect
from cxr_ray.screen.report.template import TEMPLATE

REPORT_FILE = "_report.html"
CHARTS_DIR = "_report"
TOP_N = 20
THUMBNAIL_PX = 160
MAX_HEATMAP_BYTES = 64 * 1024 * 1024  # an overlay is the original image's size; refuse anything absurd


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(uri: str, s3_endpoint: str | None) -> str | None:
    """A small PNG of a heatmap overlay as a data URI (None when it cannot be read: it is only a picture)."""
    try:
        with Image.open(io.BytesIO(read_bytes(uri, s3_endpoint, max_bytes=MAX_HEATMAP_BYTES))) as image:
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return data_uri(buffer.getvalue())


def drift_of(card: ModelCard, data: ReportData) -> DriftResult:
    headers = {name: dict(data.headers[name]) for name in HEADER_FIELDS if name in data.header_fields_seen}
    return compare(card.drift_fingerprint, [int(c) for c in data.drift_counts], headers, data.scored)


def _top_rows(top: list[FlaggedRow], s3_endpoint: str | None) -> list[dict[str, Any]]:
    return [{"input_id": r.input_id, "study": r.study, "score": r.score,
             "thumbnail": thumbnail(r.heatmap_uri, s3_endpoint) if r.heatmap_uri else None} for r in top]


def run_starts(summary: dict[str, Any]) -> dict[str, float]:
    """``{run_id: start time (epoch seconds)}`` from the summary's run records."""
    out = {}
    for run in summary.get("runs", []):
        try:
            out[run["run_id"]] = datetime.fromisoformat(run["started_at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _charts(card: ModelCard, data: ReportData, drift: DriftResult, summary: dict[str, Any]) -> dict[str, bytes]:
    this_run, starts = summary.get("run_id", ""), run_starts(summary)
    fingerprint = card.drift_fingerprint if drift.available else None
    reference = (fingerprint.get("score") or {}).get("counts") if fingerprint else None
    runs = {this_run: data.batches[this_run]} if this_run in data.batches else data.batches  # else: a resume
    out = {
        "counts": charts.counts_chart(data.status, data.error_codes),
        "scores": charts.score_chart(data, card.threshold, reference),
        "throughput": charts.throughput_chart(runs, starts),
    }
    if drift.available:
        out["drift"] = charts.drift_chart(drift)
    return out


def _context(card: ModelCard, summary: dict[str, Any], data: ReportData, drift: DriftResult,
             pngs: dict[str, bytes], top: list[dict[str, Any]]) -> dict[str, Any]:
    compared = {c.name for c in drift.checks}
    return {
        "output": summary.get("output", ""), "model": {"name": card.name, "version": card.version, "arch": card.arch},
        "run_id": summary.get("run_id", ""), "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": data.rows, "flagged": data.flagged, "scored": data.scored, "threshold": card.threshold,
        "flagged_rate": "n/a" if data.flagged_rate is None else f"{data.flagged_rate:.1%}",
        "complete": summary.get("complete", False), "missing": summary.get("missing", 0),
        "status": sorted(data.status.items()), "error_codes": sorted(data.error_codes.items()),
        "top": top, "heatmaps": any(r.heatmap_uri for r in data.top),
        "runs": summary.get("runs", []), "steady": summary.get("steady_images_per_s"),
        "drift": drift, "labels": LABELS, "moderate": PSI_MODERATE, "significant": PSI_SIGNIFICANT,
        "min_images": MIN_IMAGES,
        "not_compared": [LABELS[n] for n in ("score", *HEADER_FIELDS) if n not in compared
                         and (n != "score" or card.positive_class)],  # absent from the fingerprint or the parts
        "charts": {name: data_uri(png) for name, png in pngs.items()},
    }


def write_report(layout: OutputLayout, card: ModelCard, summary: dict[str, Any]) -> dict[str, Any]:
    """Build the report from the committed parts; returns what the run summary records about it."""
    data = collect(layout, top_n=TOP_N)
    drift = drift_of(card, data)
    pngs = _charts(card, data, drift, summary)
    for name, png in pngs.items():
        with open_output(layout.uri_of(CHARTS_DIR, f"{name}.png"), "wb", s3_endpoint=layout.s3_endpoint) as handle:
            handle.write(png)
    html = TEMPLATE.render(**_context(card, summary, data, drift, pngs, _top_rows(data.top, layout.s3_endpoint)))
    with open_output(layout.uri_of(REPORT_FILE), "w", s3_endpoint=layout.s3_endpoint) as handle:
        handle.write(html)
    return {
        "file": REPORT_FILE,
        "charts": [f"{CHARTS_DIR}/{name}.png" for name in pngs],
        "drift": {"available": drift.available, "warnings": len(drift.warnings),
                  "psi": {c.name: c.psi for c in drift.checks}} | ({} if drift.available else {"reason": drift.reason}),
    }
