"""The screening job: inputs -> one or two passes -> Parquet parts -> summary -> ``_SUCCESS``.

One module per step: :mod:`~cxr_ray.screen.config` (what is asked),
:mod:`~cxr_ray.screen.resources` (how the cluster is used),
:mod:`~cxr_ray.screen.passes` (one Ray Data execution),
:mod:`~cxr_ray.screen.recovery` (rows for inputs that never came back) and
:mod:`~cxr_ray.screen.summary` (what is written, the run summary).

Memory is bounded by block and batch sizes whatever the archive size, except
the resume set (:mod:`cxr_ray.screen.inputs`: 16 bytes per already-written
input, in the object store, none in the driver during the run).

"Nothing lost" is checked, not assumed: the listing reports how many inputs
it handed over, the parts report how many rows they hold. If a batch was
lost (a worker that kept crashing on it: ``max_task_retries`` exhausted), a
second pass screens the missing inputs one at a time, and whatever still
fails to come back gets a ``worker_crashed`` row. Only then are the summary
and ``_SUCCESS`` written.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import ray

from cxr_ray.dicomnet.web import DicomwebAuth, auth_from_env, is_dicomweb, parse
from cxr_ray.errors import UsageError
from cxr_ray.io.pseudonym import key_from_env
from cxr_ray.io.storage import expand_inputs
from cxr_ray.models.card import ModelCard
from cxr_ray.ray_session import connect
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.dicom_results import SC_NOT_STORED, count_not_stored
from cxr_ray.screen.heatmaps import check_heatmaps
from cxr_ray.screen.output import SUMMARY_FILE, OutputLayout
from cxr_ray.screen.passes import ISOLATE_PASS, PassInputs, PassResult, run_pass
from cxr_ray.screen.preflight import (
    check_cluster_hardware,
    check_inputs_and_output,
    check_local_hardware,
    joins_a_cluster,
)
from cxr_ray.screen.recovery import write_crashed_rows
from cxr_ray.screen.report import report_safely
from cxr_ray.screen.schema import HEATMAP_PATH, STATUS_OK, prob_columns
from cxr_ray.screen.summary import PartsScan, finish_run, scan_parts

log = logging.getLogger(__name__)


def _put_done(scan: PartsScan) -> Any:
    """The resume set in the object store (None when nothing is written yet)."""
    done = scan.done_set()
    scan.digests.clear()
    return ray.put(done) if len(done) else None


def _check_resume(scan: PartsScan, card: ModelCard, output: str) -> None:
    others = {mv for mv in scan.models if mv != (card.name, card.version)}
    if others:
        found = ", ".join(f"{name} {version}" for name, version in sorted(others, key=str))
        raise UsageError(
            f"{output} already holds rows from another model ({found}); this run uses {card.name} "
            f"{card.version}. Resuming would mix models: write to a new output prefix."
        )


def dicomweb_auth(config: ScreenConfig) -> DicomwebAuth | None:
    """The DICOMweb credentials the flags name (read here, in the driver, like the pseudonym key)."""
    return auth_from_env(config.dicomweb_user_env, config.dicomweb_password_env, config.dicomweb_token_env)


def _check_before_any_work(config: ScreenConfig, card: ModelCard, auth: DicomwebAuth | None) -> None:
    prob_columns(card.classes)  # refuse class names that collide as columns, before any work
    check_heatmaps(card, config.heatmaps, config.heatmap_method)  # and heatmaps this model cannot have
    for spec in config.inputs:  # fail now, not in the middle of the run, if one names nothing
        try:
            next(iter(expand_inputs(spec, s3_endpoint=config.s3_endpoint, dicomweb_auth=auth)))
        except StopIteration:
            raise UsageError(f"no inputs in {spec}") from None


def _passes(config: ScreenConfig, shared: PassInputs, done_ref: Any) -> tuple[list[PassResult], int]:
    """The first pass, the isolating one if batches were lost, and the rows still missing after both."""
    first = run_pass("screen", config, shared, done_ref=done_ref, max_errored_blocks=config.max_errored_blocks)
    del done_ref
    if not first.missing:
        return [first], 0
    log.warning("%d inputs did not come back (lost batches); screening them one by one", first.missing)
    isolate = replace(config, batch_size=1, decode_batch_size=1)
    second = run_pass(ISOLATE_PASS, isolate, shared, done_ref=_put_done(scan_parts(shared.layout)),
                      max_errored_blocks=-1)
    crashed = 0
    if second.missing:
        crashed = write_crashed_rows(config, shared.layout, scan_parts(shared.layout).done_set(), shared.card,
                                     shared.run_id, shared.dicomweb_auth)
    return [first, second], crashed


def dicom_results_summary(layout: OutputLayout, target: str, heatmaps: bool = False) -> dict[str, Any]:
    """How many SRs (and, with ``heatmaps``, heatmap SCs) the output's rows got, and how many could
    not be stored (all runs into it). An SC is due for each ``ok`` DICOM row whose overlay was written."""
    ok_dicom = not_stored = captured = sc_not_stored = 0
    columns = ["status", "format", "warnings", *([HEATMAP_PATH] if heatmaps else [])]
    for _, table in layout.read_parts(layout.list_parts(), columns):
        if isinstance(table, Exception):
            continue  # scan_parts has already quarantined what it could not read
        ok = pc.and_(pc.equal(table.column("status"), STATUS_OK), pc.equal(table.column("format"), "dicom"))
        ok_dicom += int(pc.sum(ok.cast(pa.int64())).as_py() or 0)
        not_stored += count_not_stored(table.column("warnings").to_pylist())
        if heatmaps:
            with_overlay = pc.and_(ok, pc.is_valid(table.column(HEATMAP_PATH)))
            captured += int(pc.sum(with_overlay.cast(pa.int64())).as_py() or 0)
            sc_not_stored += count_not_stored(table.column("warnings").to_pylist(), SC_NOT_STORED)
    destination = parse(target).service if is_dicomweb(target) else target  # never a query string
    summary: dict[str, Any] = {"destination": destination, "stored": ok_dicom - not_stored, "not_stored": not_stored}
    if heatmaps:
        summary["secondary_captures"] = {"stored": captured - sc_not_stored, "not_stored": sc_not_stored}
    return summary


def run_screen(config: ScreenConfig, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Screen ``config.inputs`` into ``config.output``; returns the run summary (also written)."""
    key = key_from_env(config.pseudonym_key_env)
    auth = dicomweb_auth(config)
    card = check_inputs_and_output(config)  # the artifact is whole, the output writable
    _check_before_any_work(config, card, auth)
    joins = joins_a_cluster(config.address)
    if not joins:
        check_local_hardware(config)  # before Ray starts: one error line, no actor retries
    layout = OutputLayout(config.output, config.s3_endpoint)
    scan = scan_parts(layout)
    _check_resume(scan, card, config.output)
    layout.remove_marker()  # this output is being written again: not complete until we say so
    layout.clean_temporaries()
    resumed_rows = scan.rows

    started_ray = connect(config.address)
    if joins:
        try:
            check_cluster_hardware(config)
        except Exception:
            if started_ray:
                ray.shutdown()
            raise
    done_ref = _put_done(scan)  # the resume set lives in the object store during the run...
    del scan  # ...not in the driver
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    started_at = datetime.now(timezone.utc)
    t0 = time.time()
    shared = PassInputs(layout=layout, run_id=run_id, key=key, card=card, stream=stream or sys.stderr,
                        dicomweb_auth=auth)
    try:
        passes, crashed_rows = _passes(config, shared, done_ref)
    finally:
        if started_ray:
            ray.shutdown()
    summary = finish_run(layout, card, run_id, started_at, time.time() - t0, passes, crashed_rows, resumed_rows)
    if config.dicom_results:
        summary["dicom_results"] = dicom_results_summary(layout, config.dicom_results, config.heatmaps != "none")
    summary["report"] = report_safely(layout, card, summary)  # never fails the run: results are committed
    layout.write_json(SUMMARY_FILE, summary)
    if summary["complete"]:
        layout.write_marker()  # last: readers may trust everything before it
    return summary
