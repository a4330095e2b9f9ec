"""One pass of the screening pipeline: one Ray Data execution over the inputs not yet written.

::

    ListInputs (1 task, streams the listing, drops inputs already written)
      -> repartition       blocks of ``decode_batch_size`` paths
      -> decode_batch      CPU tasks: read bytes, decode, preprocess (one row per input, errors included);
                           on CPU-only clusters the Predictor actors run it on their own batches instead
      -> Predictor         actor pool, one backend per actor, GPUs when there are any
     [-> dicom results     only with --dicom-results: tasks, a Comprehensive SR per ok DICOM row]
     [-> HeatmapWriter     only with heatmaps="flagged": actor pool, overlay PNG per flagged row]
      -> write_batch       one atomic, content-addressed Parquet part per ``rows_per_part`` rows
      -> driver            counts the parts' stats rows, shows progress (:mod:`~cxr_ray.screen.pass_progress`)
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import pyarrow.compute as pc
import ray
from ray.data import DataContext

from cxr_ray.console import is_verbose
from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.errors import CxrRayError
from cxr_ray.models.card import ModelCard
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.dicom_results import stage_arguments as dicom_results_arguments
from cxr_ray.screen.dicom_results import write_dicom_results
from cxr_ray.screen.heatmaps import HeatmapWriter, stage_arguments
from cxr_ray.screen.inputs import InputListing, listing_stats_name
from cxr_ray.screen.output import RUNS_DIR, OutputLayout
from cxr_ray.screen.pass_progress import PassProgress
from cxr_ray.screen.resources import Layout, plan_layout
from cxr_ray.screen.stages import Predictor, decode_batch, write_batch

log = logging.getLogger(__name__)

LISTING_PAGE = 1000  # paths per block the listing task yields (one S3 page)
# Ray Data merges the blocks a task yields until they exceed this size (default
# 128 MiB: about a million paths, so the listing would have to get that far
# before any decoding started). 1 MiB (~10k paths) keeps the listing streaming;
# decode outputs are sliced to this size too, which is harmless.
TARGET_BLOCK_BYTES = 1024 * 1024
ISOLATE_PASS = "isolate"  # the second pass: inputs lost in the first, one per batch


def _decode_sized_blocks(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
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
def _quiet_ray_data_warnings() -> Iterator[None]:
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
def _data_context(**settings: Any) -> Iterator[DataContext]:
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


@dataclass(frozen=True)
class PassInputs:
    """What every pass of one run shares."""

    layout: OutputLayout
    run_id: str
    key: bytes | None
    card: ModelCard
    stream: TextIO
    dicomweb_auth: DicomwebAuth | None = None


def _decode_kwargs(config: ScreenConfig, shared: PassInputs) -> dict[str, Any]:
    return {
        "preprocessing": dict(shared.card.preprocessing),
        "policy": config.policy,
        "pseudonym_key": shared.key,
        "s3_endpoint": config.s3_endpoint,
        "max_bytes": config.max_file_bytes,
        "dicomweb_auth": shared.dicomweb_auth,
    }


def _pipeline(name: str, config: ScreenConfig, shared: PassInputs, plan: Layout, done_ref: Any,
              stats_uri: str) -> ray.data.Dataset:
    """listing -> decode -> predict [-> heatmaps] -> write, as one lazy Ray Data dataset of stats rows."""
    listing = InputListing(config.inputs, s3_endpoint=config.s3_endpoint, done_ref=done_ref,
                           block_rows=LISTING_PAGE, stats_uri=stats_uri, dicomweb_auth=shared.dicomweb_auth)
    source = ray.data.read_datasource(listing, override_num_blocks=1, num_cpus=0)
    decode_kwargs = _decode_kwargs(config, shared)
    ds = _decode_sized_blocks(source, config.decode_batch_size)
    if not plan.decode_in_actors:
        ds = ds.map_batches(
            decode_batch, batch_size=config.decode_batch_size, batch_format="pyarrow", zero_copy_batch=True,  # type: ignore[arg-type]
            fn_kwargs=decode_kwargs, num_cpus=plan.decode_cpus,
            max_retries=config.max_task_retries,  # Ray Data's default (-1) retries a poison file forever
        )
    predictor_args: dict[str, Any] = {
        "num_cpus": plan.cpus_per_actor,
        "max_restarts": -1,  # an actor lost with its node comes back...
        "max_task_retries": config.max_task_retries,  # ...but a batch that keeps killing it is given up
    }
    if plan.gpus_per_actor > 0:
        predictor_args["num_gpus"] = plan.gpus_per_actor
    low, high = plan.actors
    ds = ds.map_batches(
        Predictor,
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                           max_tasks_in_flight_per_actor=_in_flight_per_actor(name)),
        fn_constructor_kwargs={
            "artifact": config.model,
            "backend": config.backend,
            "run_id": shared.run_id,
            "device": None if plan.gpus_per_actor > 0 else "cpu",  # None: the GPU Ray assigned
            "precision": config.precision,
            "tta": config.tta,
            "engine_options": config.engine_options(),
            "output": shared.layout.uri,
            "num_threads": plan.threads_per_actor,
            "s3_endpoint": config.s3_endpoint,
            "decode": decode_kwargs if plan.decode_in_actors else None,
            "decode_on": config.decode if plan.decode_on_gpu else "cpu",
        },
        **predictor_args,
    )
    if config.dicom_results:  # an SR per ok DICOM row, before the rows are written (they carry its warnings)
        ds = ds.map_batches(write_dicom_results, **dicom_results_arguments(config, shared.dicomweb_auth))  # type: ignore[arg-type]
    if config.heatmaps != "none":  # overlays for flagged rows, between predicting and writing
        ds = ds.map_batches(HeatmapWriter, **stage_arguments(config, shared.layout.uri, plan, ray.cluster_resources(),
                                                             shared.dicomweb_auth))
    return ds.map_batches(
        write_batch, batch_size=config.rows_per_part, batch_format="pyarrow",  # type: ignore[arg-type]
        fn_kwargs={"output": shared.layout.uri, "s3_endpoint": config.s3_endpoint},
        num_cpus=0,  # tiny I/O tasks: never wait behind decoding for a CPU slot
    )


def _drain(ds: ray.data.Dataset, result: PassResult, progress: PassProgress) -> None:
    """Run the pass, counting the parts' stats rows as they come back."""
    counts = {"ok": 0, "error": 0, "skipped": 0, "flagged": 0}
    first_at = first_rows = None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        result.parts += len(batch)
        result.written += int(pc.sum(batch.column("rows")).as_py() or 0)  # type: ignore[union-attr]
        for key_name in counts:
            counts[key_name] += int(pc.sum(batch.column(key_name)).as_py() or 0)  # type: ignore[union-attr]
        if result.backend is None and "backend" in batch.column_names and len(batch):  # type: ignore[union-attr]
            result.backend = batch.column("backend")[0].as_py()  # type: ignore[union-attr]
        result.status = dict(counts)
        progress.written(result.written, result.status)
        now = time.time()
        if first_at is None or first_rows is None:
            first_at, first_rows = now, result.written
        elif now - first_at >= 1.0 and result.parts >= 3:  # too few parts say nothing about a rate
            result.steady_images_per_s = round((result.written - first_rows) / (now - first_at), 3)


def _listed_to_screen(layout: OutputLayout, stats_name: str) -> int | None:
    """The listing's ``to_screen`` count, once its task has written it (None before)."""
    stats = layout.read_json(stats_name)
    return None if stats is None else int(stats.get("to_screen", 0))


def run_pass(name: str, config: ScreenConfig, shared: PassInputs, *, done_ref: Any,
             max_errored_blocks: int) -> PassResult:
    """One Ray Data execution over the inputs not in the :class:`DoneSet` behind ``done_ref``."""
    plan = plan_layout(config, ray.cluster_resources())
    stats_name = f"{RUNS_DIR}/{listing_stats_name(shared.run_id, name)}"
    result = PassResult(name=name)
    started = time.time()
    progress = PassProgress(shared.stream, config.progress_every_s, shared.run_id, name,
                            listing_total=lambda: _listed_to_screen(shared.layout, stats_name),
                            json_lines=config.progress_format == "json")
    low, high = plan.actors
    progress.begin(f"starting {low if low == high else f'{low}-{high}'} predict actors ({config.backend} backend) "
                   "and listing the inputs")
    with (
        _data_context(max_errored_blocks=max_errored_blocks, target_max_block_size=TARGET_BLOCK_BYTES,
                      enable_progress_bars=is_verbose()),  # one progress line, ours (Ray Data's with --verbose)
        _quiet_ray_data_warnings(),
    ):
        ds = _pipeline(name, config, shared, plan, done_ref, shared.layout.uri_of(*stats_name.split("/")))
        _drain(ds, result, progress)
    result.seconds = time.time() - started
    progress.end(result.written, result.status)
    stats = shared.layout.read_json(stats_name)
    if stats is None:
        raise CxrRayError(
            f"the input listing of pass {name!r} did not finish (no {stats_name}): some inputs were "
            "never seen. The rows written so far are kept; run the same command again to resume."
        )
    result.listed = int(stats.get("listed", 0))
    result.already_done = int(stats.get("already_done", 0))
    result.to_screen = int(stats.get("to_screen", 0))
    return result
