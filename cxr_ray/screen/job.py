"""The screening job: inputs -> decode -> predict -> Parquet parts -> summary -> ``_SUCCESS``.

::

    ListInputs (1 task, streams the listing, drops inputs already written)
      -> repartition       blocks of ``decode_batch_size`` paths
      -> decode_batch      CPU tasks: read bytes, decode, preprocess (one row per input, errors included);
                           on CPU-only clusters the Predictor actors run it on their own batches instead
      -> Predictor         actor pool, one backend per actor, GPUs when there are any
     [-> HeatmapWriter     only with heatmaps="flagged": actor pool, overlay PNG per flagged row]
      -> write_batch       one atomic, content-addressed Parquet part per ``rows_per_part`` rows
      -> driver            counts the parts' stats rows, prints progress, then checks and summarises

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

import contextlib
import json
import logging
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import ray

from cxr_ray.engines.registry import check_precision
from cxr_ray.errors import CxrRayError, UsageError
from cxr_ray.io.pseudonym import key_from_env
from cxr_ray.io.storage import expand_inputs
from cxr_ray.io.types import DecodePolicy
from cxr_ray.models.artifact import load_card
from cxr_ray.models.card import ModelCard
from cxr_ray.ray_session import connect
from cxr_ray.screen.heatmaps import (
    HeatmapWriter,
    check_heatmap_mode,
    check_heatmaps,
    stage_arguments,
)
from cxr_ray.screen.inputs import DoneSet, InputListing, listing_stats_name, path_digests
from cxr_ray.screen.output import RUNS_DIR, SUMMARY_FILE, OutputLayout
from cxr_ray.screen.schema import STATUS_ERROR, WORKER_CRASHED, output_schema, prob_columns
from cxr_ray.screen.stages import Predictor, decode_batch, display_name, write_batch
from cxr_ray.screen.summary import PartsScan, remove_duplicates, scan_parts

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024
LISTING_PAGE = 1000  # paths per block the listing task yields (one S3 page)
# Ray Data merges the blocks a task yields until they exceed this size (default
# 128 MiB: about a million paths, so the listing would have to get that far
# before any decoding started). 1 MiB (~10k paths) keeps the listing streaming;
# decode outputs are sliced to this size too, which is harmless.
TARGET_BLOCK_BYTES = 1024 * 1024
ISOLATE_PASS = "isolate"  # the second pass: inputs lost in the first, one per batch


@dataclass
class ScreenConfig:
    """Everything one screening run needs; the CLI and ``jobs/screen.py`` fill it from flags."""

    model: str
    inputs: list[str]
    output: str
    backend: str = "auto"
    precision: str = "auto"  # fp16 on GPUs, fp32 on CPUs; "bf16" opts in on CPUs with bf16 instructions
    batch_size: int = 32  # rows per predict call
    actors: tuple[int, int] | None = None  # (min, max); None: derived from the cluster
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # logical CPUs per predict actor (and its threads); None: see plan_layout
    decode_cpus: float | None = None  # logical CPUs per decode task; None: see plan_layout
    # Decode inside the predict actors instead of in decode tasks. None: yes on CPU-only
    # clusters (unless decode_cpus is given), no on GPU clusters. See plan_layout.
    decode_in_actors: bool | None = None
    decode_batch_size: int = 16  # rows per decode task (and per listing block)
    rows_per_part: int = 1000  # rows per Parquet part (resume granularity)
    pseudonym_key_env: str | None = None
    s3_endpoint: str | None = None
    address: str | None = None
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    max_errored_blocks: int = 16  # lost batches tolerated in the first pass (then recovered)
    max_task_retries: int = 3  # retries of a decode task / predict batch whose worker died
    progress_every_s: float = 15.0
    policy: DecodePolicy = field(default_factory=DecodePolicy)
    heatmaps: str = "none"  # "flagged": an overlay PNG (+ .npy) per flagged row under OUTPUT/_heatmaps/
    heatmap_method: str = "gradcam"  # or "lrp" (vgg19, densenet*, resnet18, resnet50)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        for name in ("batch_size", "decode_batch_size", "rows_per_part"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actors is not None:
            low, high = self.actors
            if not 1 <= low <= high:
                raise UsageError(f"actors must be MIN,MAX with 1 <= MIN <= MAX, got {low},{high}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UsageError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        for name in ("cpus_per_actor", "decode_cpus"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        check_heatmap_mode(self.heatmaps)
        check_precision(self.precision)


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Layout:
    """How the pipeline uses a cluster's logical resources."""

    actors: tuple[int, int]
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int
    decode_cpus: float  # 0 when decoding runs inside the predict actors
    decode_in_actors: bool = False


def plan_layout(config: ScreenConfig, cluster: dict[str, float]) -> Layout:
    """Resources per stage from the flags, defaults filled in from the cluster.

    GPU clusters: one actor per GPU (``gpus_per_actor`` = 1), each with one CPU
    for feeding it; decode tasks take one CPU each and run on every other core.

    CPU-only clusters: inference and decoding compete for the same cores and
    their cost ratio depends on the model and the files, so no static split
    is right. Every core runs one single-threaded predict actor (independent
    actors scale better than intra-op threads on small batches), and actors
    and decode tasks each ask for 0.25 logical CPU: Ray admits a few busy
    processes per core and the OS shares each core between them, while Ray
    Data's back-pressure stops decode tasks once the predict queue is full.

    Why 0.25 for the actors too: Ray Data 2.60 sizes its CPU budget from what
    its autoscaling coordinator reserves, i.e. the bundles its rate model asks
    for plus the cluster's leftover CPUs, and the leftover is split with floor
    division, so a fractional leftover is lost. With actors at 0.5 on 2 cores
    (1.0) plus the one decode bundle the rate model asked for (0.25), the 0.75
    left over was dropped: a budget of 1.25 CPU, one decode task at a time,
    and the predict queue ran dry (``Predictor: Tasks: 1; Actors: 2`` in Ray
    Data's progress log). ``cxr-ray bench screen`` on 2 cores, densenet121 bf16,
    3,600 files: 178.9 s at 0.5, 150-155 s at 0.25, whose budget never falls
    below 3 concurrent decode tasks.

    Better still on CPU-only clusters, and the default there: no decode tasks
    at all. Each predict actor decodes its own batch (read -> decode ->
    predict in one process per core), which saves the decode workers, their
    object-store hand-off and Ray's per-task work: the same 3,600 files in
    131 s (27.4 img/s, about 0.87 of the machine bound) against 150-155 s
    (figures from before JPEG 2000 frames were decoded at reduced resolution).
    GPU clusters keep decode tasks: there decoding must scale on every other
    core while the GPU actors only predict.
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = max(1.0, float(cluster.get("CPU", 1)))
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    on_gpu = gpus_per_actor > 0
    cpus_per_actor = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if on_gpu else 0.25)
    decode_in_actors = (
        config.decode_in_actors if config.decode_in_actors is not None
        else not on_gpu and config.decode_cpus is None
    )
    if decode_in_actors:
        decode_cpus = 0.0
    else:
        decode_cpus = config.decode_cpus if config.decode_cpus is not None else (1.0 if on_gpu else 0.25)
    threads = max(1, round(cpus_per_actor)) if config.cpus_per_actor is not None or on_gpu else 1
    if config.actors is not None:
        actors = tuple(config.actors)
    elif on_gpu:
        actors = (1, max(1, int(gpus // gpus_per_actor)) if gpus else 1)
    else:
        n = max(1, min(int(cpus // threads), int((cpus - decode_cpus) // cpus_per_actor)))
        actors = (n, n)
    if not on_gpu and actors[0] * cpus_per_actor + decode_cpus > cpus:
        log.warning(
            "%d predict actors x %.2f CPU + %.2f CPU per decode task exceed the cluster's %.0f CPUs: "
            "decoding can only start if the cluster grows", actors[0], cpus_per_actor, decode_cpus, cpus,
        )
    return Layout(actors, gpus_per_actor, cpus_per_actor, threads, decode_cpus, decode_in_actors)


def _decode_sized_blocks(ds, rows: int):
    """Cut the listing's output into blocks of ``rows`` paths.

    The listing is ONE task; without this, decoding would see its output as a
    few big blocks: one decode task each (no parallelism), and a worker crash
    would lose thousands of inputs at once instead of ``rows``.

    Ray 2.60's ``repartition`` takes no resource arguments and asks 1 CPU per
    task; a task that waits for decoding to consume its output while holding a
    CPU that decoding needs deadlocks small clusters. The split is trivial
    work, so it asks for none (``num_cpus=0``, set on the logical operator).
    """
    out = ds.repartition(target_num_rows_per_block=rows)
    remote_args = getattr(getattr(out, "_logical_plan", None), "dag", None)
    remote_args = getattr(remote_args, "ray_remote_args", None)
    if isinstance(remote_args, dict):
        remote_args["num_cpus"] = 0
    else:  # pragma: no cover - a Ray whose internals moved: still correct, needs a spare CPU
        log.warning("could not set the repartition's CPU request to 0 (Ray internals changed)")
    return out


@contextlib.contextmanager
def _quiet_ray_data_warnings():
    """Silence two Ray 2.60 warnings that do not apply here.

    * "``ray_remote_args`` is deprecated": ``max_restarts`` / ``max_task_retries``
      have no named parameter yet, and Ray Data's defaults (-1, -1) would retry
      a batch that kills its actor forever; ``read_datasource`` also warns about
      its own resolved arguments when only ``num_cpus`` is given.
    * "minimum number of concurrent actors ... only received 1 input(s)": the
      listing is one streaming read task whose row count is unknown up front;
      it yields many blocks.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        yield


@contextlib.contextmanager
def _data_context(**settings):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {key: getattr(ctx, key) for key in settings}
    for key, value in settings.items():
        setattr(ctx, key, value)
    try:
        yield ctx
    finally:
        for key, value in saved.items():
            setattr(ctx, key, value)


# --------------------------------------------------------------------------- one pass


def _in_flight_per_actor(pass_name: str) -> int | None:
    """Batches Ray Data may queue on one predict actor (None: its default, 2 here).

    A batch that kills its actor takes every batch queued on that actor with it, and each of
    them spends a retry. In the isolating pass (one file per batch) a neighbour queued behind
    the poison file could run out of retries and be reported ``worker_crashed`` although it is
    fine, so there each actor holds one batch. In the first pass the neighbours lost this way
    are screened again by the isolating pass, so the queue that keeps actors busy is worth it.
    """
    return 1 if pass_name == ISOLATE_PASS else None


@dataclass
class PassResult:
    name: str
    listed: int = 0
    already_done: int = 0
    to_screen: int = 0
    written: int = 0
    parts: int = 0
    seconds: float = 0.0
    backend: str | None = None
    status: dict = field(default_factory=dict)
    # Steady-state rate: rows after the first part / time from the first part to the last.
    steady_images_per_s: float | None = None

    @property
    def missing(self) -> int:
        return max(0, self.to_screen - self.written)


class _Progress:
    """A periodic JSON line on stderr (next to Ray Data's own progress bars)."""

    def __init__(self, stream: TextIO, every_s: float, run_id: str, pass_name: str) -> None:
        self.stream, self.every_s, self.run_id, self.pass_name = stream, every_s, run_id, pass_name
        self.started = self.last = time.time()

    def maybe(self, result: PassResult, force: bool = False) -> None:
        now = time.time()
        if not force and (self.every_s <= 0 or now - self.last < self.every_s):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        line = {
            "event": "progress",
            "run_id": self.run_id,
            "pass": self.pass_name,
            "rows": result.written,
            "parts": result.parts,
            **result.status,
            "images_per_s": round(result.written / elapsed, 2),
            "elapsed_s": round(elapsed, 1),
        }
        print(json.dumps(line), file=self.stream, flush=True)


def _run_pass(
    name: str,
    config: ScreenConfig,
    *,
    layout: OutputLayout,
    done_ref,
    run_id: str,
    key: bytes | None,
    card: ModelCard,
    stream: TextIO,
    max_errored_blocks: int,
) -> PassResult:
    """One Ray Data execution over the inputs not in the :class:`DoneSet` behind ``done_ref``."""
    layout_ = plan_layout(config, ray.cluster_resources())
    (low, high), gpus_per_actor = layout_.actors, layout_.gpus_per_actor
    stats_name = f"{RUNS_DIR}/{listing_stats_name(run_id, name)}"
    listing = InputListing(
        config.inputs,
        s3_endpoint=config.s3_endpoint,
        done_ref=done_ref,
        block_rows=LISTING_PAGE,
        stats_uri=layout.uri_of(*stats_name.split("/")),
    )
    predictor_args = {
        "num_cpus": layout_.cpus_per_actor,
        "max_restarts": -1,  # an actor lost with its node comes back...
        "max_task_retries": config.max_task_retries,  # ...but a batch that keeps killing it is given up
    }
    if gpus_per_actor > 0:
        predictor_args["num_gpus"] = gpus_per_actor
    result = PassResult(name=name)
    started = time.time()
    progress = _Progress(stream, config.progress_every_s, run_id, name)
    with (
        _data_context(max_errored_blocks=max_errored_blocks, target_max_block_size=TARGET_BLOCK_BYTES),
        _quiet_ray_data_warnings(),
    ):
        source = ray.data.read_datasource(listing, override_num_blocks=1, num_cpus=0)
        decode_kwargs = {
            "preprocessing": card.preprocessing,
            "policy": config.policy,
            "pseudonym_key": key,
            "s3_endpoint": config.s3_endpoint,
            "max_bytes": config.max_file_bytes,
        }
        ds = _decode_sized_blocks(source, config.decode_batch_size)
        if not layout_.decode_in_actors:
            ds = ds.map_batches(
                decode_batch,
                batch_size=config.decode_batch_size,
                batch_format="pyarrow",
                zero_copy_batch=True,
                fn_kwargs=decode_kwargs,
                num_cpus=layout_.decode_cpus,
                max_retries=config.max_task_retries,  # Ray Data's default (-1) retries a poison file forever
            )
        ds = ds.map_batches(
            Predictor,
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=low, max_size=high, max_tasks_in_flight_per_actor=_in_flight_per_actor(name)
            ),
            fn_constructor_kwargs={
                "artifact": config.model,
                "backend": config.backend,
                "run_id": run_id,
                "device": None if gpus_per_actor > 0 else "cpu",  # None: the GPU Ray assigned
                "precision": config.precision,
                "num_threads": layout_.threads_per_actor,
                "s3_endpoint": config.s3_endpoint,
                "decode": decode_kwargs if layout_.decode_in_actors else None,
            },
            **predictor_args,
        )
        if config.heatmaps != "none":  # overlays for flagged rows, between predicting and writing
            ds = ds.map_batches(HeatmapWriter, **stage_arguments(config, layout.uri, layout_, ray.cluster_resources()))
        ds = (
            ds.map_batches(
                write_batch,
                batch_size=config.rows_per_part,
                batch_format="pyarrow",
                fn_kwargs={"output": layout.uri, "s3_endpoint": config.s3_endpoint},
                num_cpus=0,  # tiny I/O tasks: never wait behind decoding for a CPU slot
            )
        )
        counts = {"ok": 0, "error": 0, "skipped": 0, "flagged": 0}
        first_at = first_rows = None
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            result.parts += len(batch)
            result.written += int(pc.sum(batch.column("rows")).as_py() or 0)
            for key_name in counts:
                counts[key_name] += int(pc.sum(batch.column(key_name)).as_py() or 0)
            if result.backend is None and "backend" in batch.column_names and len(batch):
                result.backend = batch.column("backend")[0].as_py()
            result.status = dict(counts)
            progress.maybe(result)
            now = time.time()
            if first_at is None:
                first_at, first_rows = now, result.written
            elif now - first_at >= 1.0 and result.parts >= 3:  # too few parts say nothing about a rate
                result.steady_images_per_s = round((result.written - first_rows) / (now - first_at), 3)
    result.seconds = time.time() - started
    progress.maybe(result, force=True)
    stats = layout.read_json(stats_name)
    if stats is None:
        raise CxrRayError(
            f"the input listing of pass {name!r} did not finish (no {stats_name}): some inputs were "
            "never seen. The rows written so far are kept; run the same command again to resume."
        )
    result.listed = int(stats.get("listed", 0))
    result.already_done = int(stats.get("already_done", 0))
    result.to_screen = int(stats.get("to_screen", 0))
    return result


# --------------------------------------------------------------------------- recovery: rows for inputs that never came back


def _write_crashed_rows(
    config: ScreenConfig, layout: OutputLayout, done: DoneSet, card: ModelCard, run_id: str
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
        layout.write_part(pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema).sort_by("path"))
        written += n
        pending.clear()

    for path in expand_inputs(config.inputs, s3_endpoint=config.s3_endpoint):
        if not done.contains(path_digests([path]))[0]:
            pending.append(path)
            if len(pending) >= config.rows_per_part:
                flush()
    flush()
    return written


# --------------------------------------------------------------------------- the job


def _put_done(scan: PartsScan):
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


def _model_record(card: ModelCard) -> dict:
    return {
        "name": card.name,
        "version": card.version,
        "arch": card.arch,
        "classes": list(card.classes),
        "positive_class": card.positive_class,
        "threshold": card.threshold,
        "image_size": card.image_size,
    }


def run_screen(config: ScreenConfig, *, stream: TextIO | None = None) -> dict:
    """Screen ``config.inputs`` into ``config.output``; returns the run summary (also written)."""
    stream = stream or sys.stderr
    key = key_from_env(config.pseudonym_key_env)
    card = load_card(config.model, config.s3_endpoint)
    prob_columns(card.classes)  # refuse class names that collide as columns, before any work
    check_heatmaps(card, config.heatmaps, config.heatmap_method)  # and heatmaps this model cannot have
    layout = OutputLayout(config.output, config.s3_endpoint)
    for spec in config.inputs:  # fail now, not in the middle of the run, if one names nothing
        try:
            next(iter(expand_inputs(spec, s3_endpoint=config.s3_endpoint)))
        except StopIteration:
            raise UsageError(f"no inputs in {spec}") from None

    scan = scan_parts(layout)
    _check_resume(scan, card, config.output)
    layout.remove_marker()  # this output is being written again: not complete until we say so
    layout.clean_temporaries()
    resumed_rows = scan.rows

    started_ray = connect(config.address)
    done_ref = _put_done(scan)  # the resume set lives in the object store during the run...
    del scan  # ...not in the driver
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    started_at = datetime.now(timezone.utc)
    t0 = time.time()
    passes: list[PassResult] = []
    crashed_rows = 0
    try:
        common = {"layout": layout, "run_id": run_id, "key": key, "card": card, "stream": stream}
        first = _run_pass("screen", config, done_ref=done_ref, max_errored_blocks=config.max_errored_blocks, **common)
        passes.append(first)
        del done_ref
        if first.missing:
            log.warning("%d inputs did not come back (lost batches); screening them one by one", first.missing)
            isolate = replace(config, batch_size=1, decode_batch_size=1)
            second = _run_pass(ISOLATE_PASS, isolate, done_ref=_put_done(scan_parts(layout)), max_errored_blocks=-1, **common)
            passes.append(second)
            if second.missing:
                crashed_rows = _write_crashed_rows(config, layout, scan_parts(layout).done_set(), card, run_id)
    finally:
        if started_ray:
            ray.shutdown()
    seconds = time.time() - t0
    summary = _finish(layout, card, run_id, started_at, seconds, passes, crashed_rows, resumed_rows)
    if summary["complete"]:
        layout.write_marker()  # last: readers may trust everything before it
    return summary


def _finish(
    layout: OutputLayout,
    card: ModelCard,
    run_id: str,
    started_at: datetime,
    seconds: float,
    passes: list[PassResult],
    crashed_rows: int,
    resumed_rows: int,
) -> dict:
    """Check what is written (de-duplicating if needed), record the run, write ``_summary.json``.

    The counts come from the parts themselves (all runs), read once more: 16
    bytes per row in the driver for the duplicate check, plus counters.
    """
    final = scan_parts(layout)
    duplicates = remove_duplicates(layout, final)
    if duplicates:
        final = scan_parts(layout)
    screened = sum(p.written for p in passes) + crashed_rows
    first = passes[0]
    missing = max(0, first.to_screen - screened)
    run_record = {
        "run_id": run_id,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "inputs_listed": first.listed,
        "already_done": first.already_done,
        "screened": screened,
        "images_per_s": round(screened / seconds, 3) if seconds > 0 else None,
        "backend": next((p.backend for p in passes if p.backend), None),
        "passes": [asdict(p) | {"missing": p.missing} for p in passes],
        "worker_crashed_rows": crashed_rows,
        "duplicates_removed": duplicates,
        "model": _model_record(card),
    }
    layout.write_json(f"{RUNS_DIR}/{run_id}.json", run_record)
    runs = [r for r in layout.list_json(RUNS_DIR, ".json") if "passes" in r]
    summary = {
        "output": layout.uri,
        "complete": missing == 0,
        "inputs": first.listed,
        "rows": final.rows,
        "missing": missing,
        "resumed_rows": resumed_rows,
        "screened_this_run": screened,
        "status": {s: final.status.get(s, 0) for s in ("ok", "error", "skipped")},
        "error_codes": dict(sorted(final.error_codes.items())),
        "predicted_label": {c: final.labels.get(c, 0) for c in card.classes},
        "flagged": final.flagged,
        "threshold": card.threshold,
        "model": _model_record(card),
        "backend": run_record["backend"],
        "backends": dict(final.backends),
        "run_id": run_id,
        "run_ids": sorted(final.runs),
        "images_per_s": run_record["images_per_s"],
        "steady_images_per_s": first.steady_images_per_s,
        "seconds": run_record["seconds"],
        "runs": [
            {k: r.get(k) for k in ("run_id", "started_at", "seconds", "screened", "images_per_s", "backend")}
            for r in sorted(runs, key=lambda r: r.get("started_at", ""))
        ],
        "parts": len(final.parts),
        "duplicates_removed": duplicates,
        "quarantined_parts": final.quarantined,
        "worker_crashed_rows": crashed_rows,
    }
    layout.write_json(SUMMARY_FILE, summary)
    return summary

