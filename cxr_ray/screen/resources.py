"""How a screening run uses a cluster's logical resources: plain arithmetic, no Ray.

:func:`plan_layout` turns a :class:`~cxr_ray.screen.config.ScreenConfig` and
the cluster's resource totals into a :class:`Layout`; the pass and the heatmap
stage only read it, and tests call it with made-up clusters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cxr_ray.io.gpu.mode import gpu_decode_planned
from cxr_ray.screen.config import (
    CPU_ACTOR_CPUS,
    CPU_DECODE_CPUS,
    GPU_ACTOR_CPUS,
    GPU_DECODE_CPUS,
    ScreenConfig,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How the pipeline uses a cluster's logical resources."""

    actors: tuple[int, int]
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int
    decode_cpus: float  # 0 when decoding runs inside the predict actors
    decode_in_actors: bool = False
    decode_on_gpu: bool = False  # the predict actors decode on their GPUs (--decode gpu / auto)


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
    GPU clusters keep decode tasks (there decoding must scale on every other
    core while the GPU actors only predict), unless the actors decode on their
    GPUs (``--decode gpu``, or ``auto`` where nvImageCodec is installed): then
    each GPU actor reads, decodes and predicts its own batches, and no decode
    tasks run (:func:`~cxr_ray.io.gpu.mode.gpu_decode_planned`).
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = max(1.0, float(cluster.get("CPU", 1)))
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    on_gpu = gpus_per_actor > 0
    cpus_per_actor = config.cpus_per_actor if config.cpus_per_actor is not None else (
        GPU_ACTOR_CPUS if on_gpu else CPU_ACTOR_CPUS)
    decode_on_gpu = gpu_decode_planned(config.decode, on_gpu=on_gpu)
    decode_in_actors = decode_on_gpu or (
        config.decode_in_actors if config.decode_in_actors is not None
        else not on_gpu and config.decode_cpus is None
    )
    if decode_in_actors:
        decode_cpus = 0.0
    else:
        decode_cpus = config.decode_cpus if config.decode_cpus is not None else (
            GPU_DECODE_CPUS if on_gpu else CPU_DECODE_CPUS)
    threads = max(1, round(cpus_per_actor)) if config.cpus_per_actor is not None or on_gpu else 1
    if config.actors is not None:
        actors = (int(config.actors[0]), int(config.actors[1]))
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
    return Layout(actors, gpus_per_actor, cpus_per_actor, threads, decode_cpus, decode_in_actors, decode_on_gpu)


def heatmap_actor_cpus(plan: Layout, cluster: dict[str, float]) -> float:
    """CPUs per heatmap actor: a predict actor's share on CPU-only clusters, one on GPU clusters.

    Where the predict actors and a decode task already take every CPU (a one-CPU
    machine), the heatmap actors ask for none: a CPU request there could never
    be met while the other stages hold theirs.
    """
    cpus = GPU_ACTOR_CPUS if plan.gpus_per_actor > 0 else plan.cpus_per_actor
    taken = plan.actors[0] * plan.cpus_per_actor + plan.decode_cpus
    if taken + cpus > float(cluster.get("CPU", 1)):
        log.info("heatmap actors ask for no CPU: predict actors and decoding take the cluster's %s", cluster.get("CPU"))
        return 0.0
    return cpus
