"""``cxr-ray bench screen``'s measured run: the screening job as a user runs it, on a Ray already up."""

from __future__ import annotations

import contextlib
import os
import time

import ray

from cxr_ray.bench.measure import CpuMeter
from cxr_ray.ray_session import connect
from cxr_ray.screen.config import ScreenConfig, parse_actors
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.resources import plan_layout


def job_config(args, artifact: str, inputs: str, output: str):
    """The job as a user runs it: the CLI's defaults unless a flag here overrides them."""

    return ScreenConfig(
        model=artifact,
        inputs=[inputs],
        output=output,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        actors=parse_actors(args.actors) if args.actors else None,
        cpus_per_actor=args.cpus_per_actor,
        decode_cpus=args.decode_cpus,
        rows_per_part=100,  # enough parts for a steady-state rate
        progress_every_s=0,
    )


@contextlib.contextmanager
def ready_ray(cores: int):
    """The Ray the job runs on: the one already running, else a local one started here (and
    shut down after), entered only once it runs a task on every core.

    ``ray.init`` returns while the worker processes it prestarts are still
    importing Ray (2-3 s here); the job would pay for that inside its own
    clock, which a job submitted to a running cluster, the case measured
    here, does not.
    """

    @ray.remote(num_cpus=1)
    def ready() -> int:
        return os.getpid()

    started = connect(None)
    try:
        if started:
            ray.get([ready.remote() for _ in range(cores)])
        yield
    finally:
        if started:
            ray.shutdown()


def ray_job(config) -> dict:

    layout = plan_layout(config, ray.cluster_resources())

    with open(os.devnull, "w") as sink, CpuMeter() as cpu:
        t0 = time.perf_counter()
        summary = run_screen(config, stream=sink)
        wall = time.perf_counter() - t0
    rows = summary["rows"]
    return {
        "images": rows,
        "seconds": round(wall, 3),
        "images_per_s": rows / wall,
        **cpu.report(rows, wall),
        "steady_images_per_s": summary.get("steady_images_per_s"),
        "backend": summary["backend"],
        "status": summary["status"],
        "layout": {
            "actors": list(layout.actors),
            "cpus_per_actor": layout.cpus_per_actor,
            "threads_per_actor": layout.threads_per_actor,
            "decode_cpus": layout.decode_cpus,
            "decode_in_actors": layout.decode_in_actors,
            "batch_size": config.batch_size,
            "decode_batch_size": config.decode_batch_size,
        },
    }
