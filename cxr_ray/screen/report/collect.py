"""What the screening report shows, gathered from the committed Parquet parts, one part at a time.

The report describes the whole output (every run that wrote into it, like
``_summary.json``): its counts are the Parquet's own. Memory stays small
whatever the archive size: counters, two fixed histograms, the top-N rows
and, for throughput, one (timestamp, rows) pair per written batch.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.models.fingerprint import (
    HEADER_FIELDS,
    SCORE_BINS,
    category,
    score_histogram,
    size_band,
)
from cxr_ray.screen.inputs import path_digests
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.schema import HEATMAP_PATH, STATUS_OK, STATUSES

CHART_BINS = 20  # the score histogram's resolution (drift uses the fingerprint's coarser bins)
COLUMNS = ["path", "status", "error_code", "score", "flagged", HEATMAP_PATH, "run_id", "screened_at",
           "instance_pseudonym", "study_pseudonym", "rows", "cols", *HEADER_FIELDS]


@dataclass(order=True)
class FlaggedRow:
    """One of the top-N flagged inputs: its score and pseudonymous identifiers only."""

    score: float
    input_id: str = field(compare=False)  # the instance pseudonym, else a digest of the path
    study: str | None = field(compare=False, default=None)
    heatmap_uri: str | None = field(compare=False, default=None)


@dataclass
class ReportData:
    rows: int = 0
    status: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    flagged: int = 0
    scored: int = 0  # ok rows with a score
    chart_counts: np.ndarray = field(default_factory=lambda: np.zeros(CHART_BINS, dtype=np.int64))
    drift_counts: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))  # drift's bins
    headers: dict[str, Counter] = field(default_factory=lambda: {name: Counter() for name in HEADER_FIELDS})
    header_fields_seen: set[str] = field(default_factory=set)
    top: list[FlaggedRow] = field(default_factory=list)
    batches: dict[str, Counter] = field(default_factory=dict)  # run_id -> {screened_at (us): rows}

    @property
    def ok(self) -> int:
        return self.status.get(STATUS_OK, 0)

    @property
    def flagged_rate(self) -> float | None:
        return self.flagged / self.ok if self.ok else None


def input_id(path: str, instance_pseudonym: str | None) -> str:
    """How the report names an input: never its path (which may hold a name), only a pseudonym
    or the path digest that also names its heatmap file under ``_heatmaps/``."""
    if instance_pseudonym:
        return f"instance {instance_pseudonym[:16]}"
    return f"input {path_digests([path])[0].tobytes().hex()[:16]}"


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * len(table)


def _add_headers(data: ReportData, table: pa.Table) -> None:
    data.header_fields_seen.update(n for n in HEADER_FIELDS if n in table.column_names)
    if "size_band" not in table.column_names and {"rows", "cols"} <= set(table.column_names):
        data.header_fields_seen.add("size_band")
    rows, cols = _column(table, "rows"), _column(table, "cols")
    for name in HEADER_FIELDS:
        if name == "size_band":
            data.headers[name].update(size_band(r, c) for r, c in zip(rows, cols, strict=True))
        elif name in table.column_names:
            data.headers[name].update(category(v) for v in table.column(name).to_pylist())


def _add_top(data: ReportData, ok: pa.Table, top_n: int) -> None:
    flagged = ok.filter(pc.fill_null(ok.column("flagged"), False))
    if not len(flagged):
        return
    candidates = [
        FlaggedRow(score=float(s), input_id=input_id(p, i), study=st[:16] if st else None, heatmap_uri=h)
        for s, p, i, st, h in zip(_column(flagged, "score"), _column(flagged, "path"),
                                  _column(flagged, "instance_pseudonym"), _column(flagged, "study_pseudonym"),
                                  _column(flagged, HEATMAP_PATH), strict=True)
        if s is not None
    ]
    data.top = heapq.nlargest(top_n, data.top + candidates)


def _add(data: ReportData, table: pa.Table, top_n: int) -> None:
    data.rows += len(table)
    data.status.update(table.column("status").to_pylist())
    data.error_codes.update(c for c in table.column("error_code").to_pylist() if c is not None)
    for run_id, at in zip(_column(table, "run_id"), _column(table, "screened_at"), strict=True):
        if at is not None:
            data.batches.setdefault(run_id or "?", Counter())[at.timestamp()] += 1
    ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
    data.flagged += int(pc.sum(pc.fill_null(ok.column("flagged"), False).cast(pa.int64())).as_py() or 0)
    scores = np.asarray([s for s in _column(ok, "score") if s is not None], dtype=np.float64)
    data.scored += len(scores)
    data.chart_counts += np.histogram(np.clip(scores, 0, 1), bins=CHART_BINS, range=(0, 1))[0]
    data.drift_counts += np.asarray(score_histogram(scores), dtype=np.int64)
    _add_headers(data, ok)
    _add_top(data, ok, top_n)


def collect(layout: OutputLayout, *, top_n: int = 20) -> ReportData:
    """Read every committed part of ``layout`` once (unreadable ones were quarantined by the summary)."""
    data = ReportData()
    for _, table in layout.read_parts(layout.list_parts(), None):
        if isinstance(table, Exception):
            raise table
        _add(data, table.select([c for c in COLUMNS if c in table.column_names]), top_n)
    for name in STATUSES:
        data.status.setdefault(name, 0)
    return data
