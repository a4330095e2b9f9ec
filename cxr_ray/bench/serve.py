"""``cxr-ray bench serve``: latency and throughput of the HTTP endpoint, with and without batching.

One run measures, on the same machine and image:

* ``decode_ms`` / ``model_ms``: in this process, ``decode_image + preprocess``
  of the request image and ``Backend.predict`` of one image (medians);
* ``batching_ceiling``: the backend's time per image in a batch of one over
  its time per image in a full batch (``max_batch_size``), i.e. the most any
  batching policy can gain on this hardware when the model is the bottleneck
  (GPUs: several x; CPUs: little, their cost per image barely drops);
* per mode (``batched``: dynamic batching on; ``unbatched``: one backend call
  per request), the same app deployed on a loopback Serve proxy in turn:
  single-request latency (sequential, p50 / p95) and throughput at 1, 4 and
  16 concurrent HTTP clients, plus the server's own decode / model times and
  the mean batch size the model saw.

The checks the README quotes are computed here: ``p50 <= decode + model + 20 ms``
and ``throughput(16, batched) >= 1.5 x throughput(16, unbatched)``. The clock
is wall time (``time.perf_counter``); the client shares the machine, so on a
small box the figures are a lower bound of what the server alone can do.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from PIL import Image
from ray import serve

from cxr_ray.bench.measure import random_artifact
from cxr_ray.bench.serve_load import bench_mode
from cxr_ray.engines.load import load_backend
from cxr_ray.engines.registry import BACKEND_NAMES, PRECISION_NAMES
from cxr_ray.errors import UsageError
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import preprocess
from cxr_ray.progress import stage
from cxr_ray.serve.app import app_builder
from cxr_ray.serve.config import DeploymentArgs, ServeArgs

DEFAULT_CONCURRENCY = (1, 4, 16)
APP_NAME = "cxr-ray-bench"
ROUTE = "/bench"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="HTTP endpoint latency / throughput, batching on vs off (Ray Serve, loopback)",
        description=(
            "p50/p95 single-request latency and throughput at 1, 4 and 16 concurrent clients of "
            "POST /v1/predict, with dynamic batching and without, plus decode and model time "
            "measured in the same run. JSON on stdout."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model artifact directory (local or s3://)")
    source.add_argument(
        "--arch", help="benchmark a randomly initialised model of this architecture"
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="input size with --arch (default 224)"
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per measurement (default 200)"
    )
    parser.add_argument(
        "--image", default=None, help="request image (default: a synthetic 512x512 8-bit PNG)"
    )
    parser.add_argument(
        "--backend", default="auto", choices=BACKEND_NAMES
    )
    parser.add_argument(
        "--precision", default="auto", choices=PRECISION_NAMES,
        help="backend precision (default auto: fp16 on GPUs, fp32 on CPUs)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="backend intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="batched mode: max batch (default 16)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=0.0, help="batched mode: max wait (default 0, as cxr-ray serve)"
    )
    parser.add_argument(
        "--topology", default="fused", choices=("fused", "split"),
        help="serve app layout (default fused: decode and model in one replica)",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, DEFAULT_CONCURRENCY)),
        help="comma-separated client counts (default 1,4,16)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray address (default: a local Ray for this command)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        concurrency = tuple(int(c) for c in str(args.concurrency).split(",") if c.strip())
    except ValueError:
        raise UsageError(
            f"--concurrency must be integers separated by commas, got {args.concurrency!r}"
        ) from None
    if not concurrency or min(concurrency) < 1 or args.requests < 1:
        raise UsageError("--concurrency values and --requests must be >= 1")

    owns_ray = not ray.is_initialized()
    if owns_ray:
        address = args.address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False
        ) if address else ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-serve-") as tmp:
            model = args.model or random_artifact(Path(tmp) / "model", args.arch, args.image_size)
            image = Path(args.image).read_bytes() if args.image else synthetic_png(512)
            result = bench_serve(
                model,
                image,
                requests=args.requests,
                concurrency=concurrency,
                backend=args.backend,
                precision=args.precision,
                threads=args.threads or os.cpu_count() or 1,
                max_batch_size=args.max_batch_size,
                batch_wait_s=args.batch_wait_ms / 1000,
                topology=args.topology,
            )
    finally:
        if owns_ray:
            ray.shutdown()
    print(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------- building blocks


def synthetic_png(size: int = 512, seed: int = 0) -> bytes:
    """A smooth 8-bit grey PNG (chest-like intensity range); content does not matter for timing."""

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.05 * rng.standard_normal((size, size))
    buffer = io.BytesIO()
    Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8), mode="L").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_serve(host: str = "127.0.0.1", port: int = 0) -> int:
    """Start Serve's HTTP proxy (``port=0``: a free one) and return the port it listens on.

    If Serve already runs in this Ray cluster, its proxy is reused and its port returned.
    """

    serve.start(http_options={"host": host, "port": port or _free_port(host)})
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - private API moved: the port we asked for
        return port


def _elapsed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return round(statistics.median(_elapsed_ms(fn) for _ in range(repeats)), 3)


def _interleaved_medians_ms(single, full, per_round: int, rounds: int) -> tuple[float, float]:
    """Medians of ``single()`` and ``full()`` timed in alternation: ``per_round`` singles, then one full.

    Alternating keeps a host that drifts over seconds (shared VMs: the same call
    measured 30-50 ms minutes apart) from biasing their ratio, the batching ceiling.
    """
    single(), full()  # warm-up
    singles, fulls = [], []
    for _ in range(rounds):
        singles += [_elapsed_ms(single) for _ in range(per_round)]
        fulls.append(_elapsed_ms(full))
    return round(statistics.median(singles), 3), round(statistics.median(fulls), 3)


def local_timings(
    model: str, image: bytes, *, backend: str, threads: int, precision: str = "auto", repeats: int = 30,
    max_batch_size: int = 16,
) -> dict:
    """decode + preprocess, one-image predict and full-batch predict, in this process (medians, ms)."""

    card = load_card(model)
    config = card.preprocess_config

    def decode():
        return preprocess(
            decode_image(image, "bench", target_size=config.image_size).pixels, config
        )

    tensor = decode()[None]
    engine = load_backend(model, backend, precision=precision, num_threads=threads)
    full = np.repeat(tensor, max_batch_size, axis=0)
    model_ms, full_ms = _interleaved_medians_ms(
        lambda: engine.predict(tensor), lambda: engine.predict(full), max_batch_size,
        rounds=max(3, repeats // max_batch_size),
    )
    return {
        "decode_ms": _median_ms(decode, repeats),
        "model_ms": model_ms,
        "model_ms_per_image_at_max_batch": round(full_ms / max_batch_size, 3),
        "batching_ceiling": round(model_ms / (full_ms / max_batch_size), 2),
        "backend": engine.label,
        "arch": card.arch,
        "image_size": card.image_size,
    }


def _target(model: str, *, batching: bool, backend: str, precision: str, threads: int,
            max_batch_size: int, batch_wait_s: float, topology: str = "fused"):
    """One mode as its own Serve app on ``/bench-batched`` or ``/bench-unbatched``."""

    mode = "batched" if batching else "unbatched"
    args = ServeArgs(
        model=model, backend=backend, precision=precision, num_threads=threads, batching=batching,
        max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s, explain=False, topology=topology,
        ingress=DeploymentArgs(num_replicas=1, max_ongoing_requests=256, max_queued_requests=1024,
                               ray_actor_options={"num_cpus": 0}),
        predictor=DeploymentArgs(num_replicas=1, max_ongoing_requests=max(64, 2 * max_batch_size),
                                 max_queued_requests=64, ray_actor_options={"num_cpus": 0}),
    )
    return serve.RunTarget(app_builder(args), name=f"{APP_NAME}-{mode}", route_prefix=f"/bench-{mode}")


def _wait_healthy(base: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench app at {base} not healthy after {timeout_s} s")
        time.sleep(0.5)


def bench_serve(
    model: str,
    image: bytes,
    *,
    requests: int = 200,
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY,
    backend: str = "auto",
    precision: str = "auto",
    threads: int = 1,
    max_batch_size: int = 16,
    batch_wait_s: float = 0.0,
    topology: str = "fused",
) -> dict:
    """The whole benchmark (Ray must be initialised); returns the JSON document."""
    clock = time.perf_counter()
    stage("decode and model timings in this process")
    local = local_timings(model, image, backend=backend, threads=threads, precision=precision,
                          max_batch_size=max_batch_size)
    wall = {"local_timings": round(time.perf_counter() - clock, 1)}
    port = start_serve("127.0.0.1", 0)

    options = dict(backend=backend, precision=precision, threads=threads, max_batch_size=max_batch_size,
                   batch_wait_s=batch_wait_s, topology=topology)
    targets = {mode: _target(model, batching=mode == "batched", **options) for mode in ("batched", "unbatched")}  # type: ignore[arg-type]
    # Both apps start together (replica start-up is most of the wall time), then are
    # measured one after the other; the idle one costs memory, not CPU.
    clock = time.perf_counter()
    stage("deploying the batched and unbatched apps on Ray Serve")
    serve.run_many(list(targets.values()))
    modes = {}
    try:
        for mode, target in targets.items():
            base = f"http://127.0.0.1:{port}{target.route_prefix}"
            _wait_healthy(base)
            wall.setdefault("deploy", round(time.perf_counter() - clock, 1))
            clock = time.perf_counter()
            stage(f"{mode}: {requests} requests at concurrency {', '.join(map(str, concurrency))}")
            modes[mode] = bench_mode(f"{base}/v1/predict", image, requests=requests, concurrency=concurrency)
            wall[f"measure_{mode}"] = round(time.perf_counter() - clock, 1)
    finally:
        for target in targets.values():
            serve.delete(target.name)
    top = str(max(concurrency))
    budget = round(local["decode_ms"] + local["model_ms"] + 20, 3)
    p50 = {mode: figures["single_request_latency_ms"]["p50"] for mode, figures in modes.items()}
    batched_top = modes["batched"]["throughput_rps"][top]
    unbatched_top = modes["unbatched"]["throughput_rps"][top]
    speedup = round(batched_top / unbatched_top, 2) if batched_top and unbatched_top else None
    return {
        "suite": "serve",
        "clock": "wall (time.perf_counter), client on the same machine over loopback",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": {
            "arch": local["arch"],
            "image_size": local["image_size"],
            "backend": local["backend"],
            "threads": threads,
        },
        "request": {"bytes": len(image), "content_type": "image/png"},
        "requests_per_measurement": requests,
        "wall_s": wall,
        "topology": topology,
        "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_s},
        "decode_ms": local["decode_ms"],
        "model_ms": local["model_ms"],
        "model_ms_per_image_at_max_batch": local["model_ms_per_image_at_max_batch"],
        "batching_ceiling": local["batching_ceiling"],
        "modes": modes,
        "checks": {
            "budget_ms (decode + model + 20)": budget,
            "single_request_p50_ms": p50,
            "p50_within_budget": {mode: bool(v <= budget) for mode, v in p50.items()},
            f"throughput_speedup_at_{top}": speedup,
            f"speedup_at_{top}_ge_1_5": bool(speedup is not None and speedup >= 1.5),
        },
    }
