"""The screening report: ``OUTPUT/_report.html`` (self-contained) plus ``OUTPUT/_report/*.png``.

:func:`report_safely` is what the job calls: the report is a view of results
already committed, so it must never cost them. Any failure is one log line
and a ``{"error": ...}`` entry in the summary; the run still succeeds.
"""

from __future__ import annotations

import logging
from typing import Any

from cxr_ray.io.inputs import failure_reason
from cxr_ray.models.card import ModelCard
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.report.render import REPORT_FILE, write_report

log = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "report_safely", "write_report"]


def report_safely(layout: OutputLayout, card: ModelCard, summary: dict[str, Any]) -> dict[str, Any]:
    """:func:`write_report`, or one warning line (the reason, never a path) when it fails."""
    try:
        return write_report(layout, card, summary)
    except Exception as exc:  # noqa: BLE001 - a report failure must never fail the screening run
        reason = failure_reason(exc)
        log.warning("screening report not written (%s); the Parquet results are complete", reason)
        return {"error": reason}
