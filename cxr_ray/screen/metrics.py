"""Prometheus series of the screening job, recorded in the workers that do the work.

``ray.util.metrics`` objects report to the node's metrics agent, which serves them on
Ray's Prometheus endpoint (``ray_`` prefixed: ``cxr_ray_screen_rows`` is scraped as
``ray_cxr_ray_screen_rows_total``) and so on the dashboard's Grafana panels. The README's
"Metrics" section lists every series.

Recording is a few calls per *batch*, never per row: counts come from vectorised
column operations. Tags stay low-cardinality on purpose: a stage name, a status and
an error code (both closed sets, :mod:`cxr_ray.screen.schema`), never a path, a run id
or anything from a header.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from ray.util.metrics import Counter, Histogram

# Seconds one batch spends in a stage: decode and predict batches take ~0.05-30 s on CPUs.
STAGE_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
NO_CODE = "none"  # error_code tag of the rows that have none (status ok)


@dataclass(frozen=True)
class _Series:
    rows: Counter
    flagged: Counter
    stage_seconds: Histogram
    stage_rows: Counter


@functools.cache
def _series() -> _Series | None:
    """Built once per worker process, on first use (never at import: the driver imports the stages).

    None without Ray: the GPU device check (``cxr_ray.bench.gpu``) runs the stages on a machine
    that has no ``ray``, and recording must not be what stops it.
    """
    try:
        from ray.util.metrics import Counter, Histogram
    except ImportError:
        return None
    return _Series(
        rows=Counter("cxr_ray_screen_rows", "Rows written to the screening output, by status and error code.",
                     tag_keys=("status", "error_code")),
        flagged=Counter("cxr_ray_screen_flagged", "Rows written with flagged = true (score >= threshold)."),
        stage_seconds=Histogram("cxr_ray_screen_stage_seconds", "Seconds one batch spent in a pipeline stage.",
                                boundaries=STAGE_SECONDS_BOUNDARIES, tag_keys=("stage",)),
        stage_rows=Counter("cxr_ray_screen_stage_rows", "Rows through a pipeline stage (per-image cost: "
                           "rate(stage_seconds_sum) / rate(stage_rows)).", tag_keys=("stage",)),
    )


def record_stage(stage: str, rows: int, seconds: float) -> None:
    """One batch of ``rows`` spent ``seconds`` in ``stage`` (decode, predict, write)."""
    series = _series()
    if series is None:
        return
    series.stage_seconds.observe(seconds, tags={"stage": stage})
    series.stage_rows.inc(rows, tags={"stage": stage})


@contextmanager
def timed_stage(stage: str, rows: int) -> Iterator[None]:
    """:func:`record_stage` for the block's duration (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record_stage(stage, rows, time.perf_counter() - start)


def record_written(table: pa.Table) -> None:
    """Count a part's rows by (status, error_code), and its flagged rows, as they are committed."""
    if len(table) == 0:
        return
    series = _series()
    if series is None:
        return
    # "status code" per row, counted in Arrow (~0.1 ms a part; a table group_by took twice that).
    status_col, code_col = table.column("status").fill_null("unknown"), table.column("error_code").fill_null(NO_CODE)
    keys = pc.binary_join_element_wise(status_col, code_col, " ")
    for group in pc.value_counts(keys).to_pylist():
        status, code = str(group["values"]).split(" ", 1)  # statuses and codes are identifiers: no spaces
        series.rows.inc(group["counts"], tags={"status": status, "error_code": code})
    flagged = pc.sum(table.column("flagged").fill_null(False).cast(pa.int64())).as_py() or 0
    if flagged:
        series.flagged.inc(flagged)
