"""Recovery: a row for every listed input that never came back, so that no input is ever lost silently.

A batch whose worker keeps crashing is given up after its retries; the
isolating pass screens the inputs of such batches one at a time, and what
still does not come back gets an ``error`` / ``worker_crashed`` row here, in
the driver. Only then are the summary and ``_SUCCESS`` written.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.io.inputs import display_name
from cxr_ray.io.storage import expand_inputs
from cxr_ray.models.card import ModelCard
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.inputs import DoneSet, path_digests
from cxr_ray.screen.metrics import record_written
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.schema import STATUS_ERROR, WORKER_CRASHED, output_schema


def write_crashed_rows(
    config: ScreenConfig, layout: OutputLayout, done: DoneSet, card: ModelCard, run_id: str,
    dicomweb_auth: DicomwebAuth | None = None,
) -> int:
    """Driver-side last resort: an ``error``/``worker_crashed`` row for every listed input still missing."""
    schema = output_schema(card.classes)
    written = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        n = len(pending)
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        columns["path"] = pa.array(pending, pa.string())
        columns["status"] = pa.array([STATUS_ERROR] * n, pa.string())
        columns["error_code"] = pa.array([WORKER_CRASHED] * n, pa.string())
        columns["error"] = pa.array(
            [f"{display_name(p)}: the worker screening this file crashed on every retry" for p in pending], pa.string()
        )
        columns["threshold"] = pa.array([card.threshold] * n, pa.float32())
        columns["model_name"] = pa.array([card.name] * n, pa.string())
        columns["model_version"] = pa.array([card.version] * n, pa.string())
        columns["run_id"] = pa.array([run_id] * n, pa.string())
        columns["screened_at"] = pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
        columns["warnings"] = pa.array([[] for _ in range(n)], pa.list_(pa.string()))
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema).sort_by("path")
        layout.write_part(table)
        record_written(table)  # counted like the stages' parts (from the driver, which is a Ray worker too)
        written += n
        pending.clear()

    for path in expand_inputs(config.inputs, s3_endpoint=config.s3_endpoint, dicomweb_auth=dicomweb_auth):
        if not done.contains(path_digests([path]))[0]:
            pending.append(path)
            if len(pending) >= config.rows_per_part:
                flush()
    flush()
    return written
