"""``cxr-ray bench screen``: the screening job against this machine's bound and a plain PyTorch loop.

One run measures, on the same files:

* ``decode``: process CPU seconds per image of the job's own decode stage
  (:func:`cxr_ray.screen.stages.decode_batch`: read, decode, preprocess), one
  process, one core;
* ``backends``: process CPU seconds per image of every backend that loads
  here, one thread each, on preprocessed batches; the cheapest is "best";
* ``bound = cores / (decode + best backend)`` images/s: what this machine
  could do if every core did nothing but useful decode and inference;
* ``ray_job``: the end-to-end throughput of :func:`cxr_ray.screen.job.run_screen`
  (listing, decode, predict, Parquet, summary; a Ray already running, as in
  production: the clock starts once its worker processes are up) and its
  steady-state rate (first part to last part);
* ``baseline``: what a user would write without this project: a
  ``torch.utils.data.DataLoader`` with ``cores`` workers decoding full
  images with Pillow / pydicom and resizing with ``F.interpolate``, feeding
  the eager NCHW fp32 model with torch's default threads;
* ratios of the above.

``--memory-check`` instead screens 1,000 and then 10,000 tiny generated files
and samples the proportional set size (PSS: shared pages split between
processes, so summing is fair) of the driver and every Ray process below
it, to show that peak memory does not grow with the archive.

Timings are wall clock (``time.perf_counter``) and process CPU time
(``time.process_time``); the machine's load average is reported next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pydicom
import ray
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from torch.utils.data import DataLoader

from cxr_ray.engines.load import load_backend
from cxr_ray.errors import UsageError
from cxr_ray.io.storage import expand_inputs
from cxr_ray.models.artifact import load_card, load_model, save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card
from cxr_ray.ray_session import connect
from cxr_ray.screen.config import ScreenConfig, parse_actors
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.resources import plan_layout
from cxr_ray.screen.stages import decode_batch

DEFAULT_CLASSES = ["covid", "normal", "pneumonia"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "screen",
        help="screening job images/s vs this machine's bound and a plain PyTorch DataLoader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model artifact directory")
    source.add_argument("--arch", help="build a randomly initialised artifact of this architecture")
    parser.add_argument(
        "--input", help="directory, glob or manifest of X-rays (required unless --memory-check)"
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="input size for --arch (default: 224)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N inputs")
    parser.add_argument("--backend", default="auto", help="backend of the Ray job (default: auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        help="precision of the Ray job (default: auto = fp32 on CPU); bf16 also adds torch bf16 to the bound's candidates",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="predict batch size (job and baseline; default: the job's 32)"
    )
    parser.add_argument(
        "--decode-batch-size", type=int, default=16, help="files per decode task in the job (default: the job's 16)"
    )
    parser.add_argument(
        "--actors",
        default=None,
        help="MIN,MAX predict actors (default: the job's own layout)",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="logical CPUs per actor (default: the job's own layout)",
    )
    parser.add_argument(
        "--decode-cpus", type=float, default=None, help="logical CPUs per decode task (default: the job's)"
    )
    parser.add_argument(
        "--decode-sample", type=int, default=64, help="files timed for the decode cost"
    )
    parser.add_argument("--backend-batches", type=int, default=4, help="batches timed per backend")
    parser.add_argument(
        "--skip-baseline", action="store_true", help="do not run the PyTorch baseline"
    )
    parser.add_argument(
        "--memory-check", action="store_true", help="peak memory at 1,000 vs 10,000 inputs instead"
    )
    parser.add_argument(
        "--memory-sizes", default="1000,10000", help="input counts for --memory-check"
    )
    parser.add_argument(
        "--work-dir", default=None, help="where to write temporary outputs (default: a temp dir)"
    )


# --------------------------------------------------------------------------- helpers


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _artifact(args, work: Path) -> str:
    if args.model:
        return args.model

    card = new_card(
        name=f"bench-{args.arch}",
        arch=args.arch,
        classes=DEFAULT_CLASSES,
        image_size=args.image_size,
        positive_class="covid",
    )
    out = work / "model"
    save_artifact(out, build_model(args.arch, len(DEFAULT_CLASSES)).eval(), card)
    return str(out)


def _list_inputs(spec: str, limit: int | None) -> list[str]:
    paths = []
    for path in expand_inputs(spec):
        paths.append(path)
        if limit and len(paths) >= limit:
            break
    return paths


def _write_manifest(paths: list[str], target: Path) -> str:
    pacsv.write_csv(pa.table({"path": paths}), str(target))
    return str(target)


class _CpuMeter:
    """CPU seconds used by this process and every process below it (the embedded Ray, DataLoader
    workers) over a block: ``user + system`` of the living processes plus what their reaped
    children used. On a shared machine it separates "the job wastes CPU" from "the job got
    little CPU": ``machine_share`` is the fraction of all cores' time that went to us."""

    def _total(self) -> float:
        psutil = importlib.import_module("psutil")
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    @staticmethod
    def _machine() -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole machine so far (all users)."""
        psutil = importlib.import_module("psutil")
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        return sum(t) - idle, sum(t)

    def __enter__(self):
        self.start, self.machine_start = self._total(), self._machine()
        return self

    def __exit__(self, *exc) -> None:
        self.used = self._total() - self.start
        busy, total = self._machine()
        self.machine_busy = (busy - self.machine_start[0]) / max(total - self.machine_start[1], 1e-9)

    def report(self, images: int, wall: float) -> dict:
        return {
            "core_s_per_image": self.used / max(images, 1),
            # Our share of all cores' time, and how busy the machine was in all (us + others):
            # share << busy ~ 1.0 means the neighbours took the rest, not that we left it idle.
            "machine_share": self.used / (wall * _cores()) if wall > 0 else None,
            "machine_busy": self.machine_busy,
        }


# --------------------------------------------------------------------------- per-stage costs


def decode_cost(paths: list[str], preprocessing: dict, chunk: int = 8) -> dict:
    """CPU seconds per image of the job's decode stage, in this one process."""


    decode_batch(
        pa.table({"path": paths[:1]}), preprocessing=preprocessing
    )  # imports, plugin registration
    cpu0, wall0 = time.process_time(), time.perf_counter()
    statuses = []
    for start in range(0, len(paths), chunk):
        out = decode_batch(
            pa.table({"path": paths[start : start + chunk]}), preprocessing=preprocessing
        )
        statuses += out.column("status").to_pylist()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "images": len(paths),
        "core_s_per_image": cpu / len(paths),
        "wall_s_per_image": wall / len(paths),
        "ok": statuses.count("ok"),
    }


def backend_costs(
    artifact: str, image_size: int, batch_size: int, batches: int, precision: str = "auto"
) -> dict:
    """CPU seconds per image of each backend that loads here, one thread, on CPU.

    fp32 engines always; with a reduced ``precision`` the torch backend at that
    precision too (its max difference from fp32, checked at load, is reported).
    """


    rng = np.random.default_rng(0)
    batch = rng.standard_normal((batch_size, 1, image_size, image_size)).astype(np.float32)
    out = {}
    engines = [("onnxruntime", "fp32"), ("torch", "fp32")]
    if precision not in ("auto", "fp32"):
        engines.append(("torch", precision))
    for name, engine_precision in engines:
        try:
            backend = load_backend(
                artifact, name, device="cpu", precision=engine_precision, num_threads=1
            )
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            failed = name if engine_precision == "fp32" else f"{name}-{engine_precision}"
            out[failed] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        backend.predict(batch)  # warm-up: allocations, kernel selection
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            backend.predict(batch)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        n = batches * batch_size
        label = backend.label
        out[label] = {"core_s_per_image": cpu / n, "wall_s_per_image": wall / n, "threads": 1}
        diff = backend.describe().get("verified_max_abs_diff_vs_fp32")
        if diff is not None and engine_precision != "fp32":
            out[label]["max_abs_diff_vs_fp32"] = diff
        del backend
    return out


# --------------------------------------------------------------------------- the Ray job


def _job_config(args, artifact: str, inputs: str, output: str):
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

    with open(os.devnull, "w") as sink, _CpuMeter() as cpu:
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


# --------------------------------------------------------------------------- the plain PyTorch baseline


class _PlainXrays:
    """A torch Dataset as a user would write it: decode the whole file, resize with torch."""

    def __init__(self, paths: list[str], image_size: int, mean: float, std: float) -> None:
        self.paths, self.image_size, self.mean, self.std = paths, image_size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, path: str):
        with open(path, "rb") as handle:
            head = handle.read(132)
        if head[128:132] == b"DICM":
            ds = pydicom.dcmread(path)
            arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
            if ds.get("PhotometricInterpretation") == "MONOCHROME1":
                arr = arr.max() - arr
        else:
            with Image.open(path) as image:
                if image.mode not in ("L", "I", "I;16", "F"):
                    image = image.convert("L")
                arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo if hi > lo else 1.0)

    def __getitem__(self, index: int):
        try:
            pixels = torch.from_numpy(self._pixels(self.paths[index]))[None, None]
        except Exception:  # noqa: BLE001 - a broken file: zeros, as many user loops do
            pixels = torch.zeros(1, 1, self.image_size, self.image_size)
        resized = F.interpolate(
            pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
        )
        return ((resized[0] - self.mean) / self.std).float()


def plain_pytorch(artifact: str, paths: list[str], batch_size: int, workers: int) -> dict:


    model, card = load_model(artifact)
    cfg = card.preprocess_config
    loader = DataLoader(
        _PlainXrays(paths, cfg.image_size, cfg.mean, cfg.std),
        batch_size=batch_size,
        num_workers=workers,
    )
    n = 0
    with _CpuMeter() as cpu, torch.no_grad():
        t0 = time.perf_counter()
        for batch in loader:
            torch.softmax(model(batch), dim=1)
            n += len(batch)
        wall = time.perf_counter() - t0
    return {
        "images": n,
        "seconds": round(wall, 3),
        "images_per_s": n / wall,
        **cpu.report(n, wall),
        "num_workers": workers,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- memory check


class _PssSampler:
    """Peak summed PSS of this process and all its descendants (the embedded Ray), sampled."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak, self.peak_processes = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        psutil = importlib.import_module("psutil")

        me = psutil.Process()
        total, count = 0, 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().pss
                count += 1
        if total > self.peak:
            self.peak, self.peak_processes = total, count

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _tiny_archive(directory: Path, n: int) -> None:
    """``n`` small distinct 64x64 PNGs, 1,000 per folder (the content does not matter here)."""

    rng = np.random.default_rng(n)
    base = (rng.random((64, 64)) * 255).astype(np.uint8)
    for i in range(n):
        folder = directory / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        image = base.copy()
        image[0, :4] = np.frombuffer(i.to_bytes(4, "little"), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"img{i:06d}.png")


def memory_check(args, artifact: str, work: Path, cores: int) -> dict:
    sizes = [int(s) for s in args.memory_sizes.split(",")]
    results = []
    with ready_ray(cores):
        for n in sizes:
            archive = work / f"tiny-{n}"
            _tiny_archive(archive, n)
            config = _job_config(args, artifact, str(archive), str(work / f"out-mem-{n}"))
            with _PssSampler() as sampler:
                job = ray_job(config)
            results.append(
                {
                    "inputs": n,
                    "rows": job["images"],
                    "seconds": job["seconds"],
                    "images_per_s": round(job["images_per_s"], 1),
                    "peak_pss_mib": round(sampler.peak / 2**20, 1),
                    "processes_at_peak": sampler.peak_processes,
                }
            )
    growth = (
        results[-1]["peak_pss_mib"] / results[0]["peak_pss_mib"] - 1 if len(results) > 1 else 0.0
    )
    return {"runs": results, "growth": round(growth, 3), "flat_within_25pct": abs(growth) <= 0.25}


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:


    cores = _cores()
    default_threads = torch.get_num_threads()  # what a plain PyTorch script gets
    with tempfile.TemporaryDirectory(prefix="cxr-bench-screen-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        artifact = _artifact(args, work)
        card = load_card(artifact)
        report: dict = {
            "suite": "screen",
            "clock": "wall: time.perf_counter; core-seconds: time.process_time",
            "cores": cores,
            "model": {
                "name": card.name,
                "arch": card.arch,
                "image_size": card.image_size,
                "version": card.version,
            },
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        }
        if args.memory_check:
            report["memory"] = memory_check(args, artifact, work, cores)
            report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(report, indent=2))
            return 0
        if not args.input:
            raise UsageError("bench screen needs --input (or --memory-check)")
        paths = _list_inputs(args.input, args.limit)
        manifest = _write_manifest(paths, work / "inputs.csv")
        report["inputs"] = len(paths)

        decode = decode_cost(paths[: args.decode_sample], card.preprocessing)
        backends = backend_costs(
            artifact, card.image_size, args.batch_size, args.backend_batches, args.precision
        )
        costs = {
            name: b["core_s_per_image"] for name, b in backends.items() if "core_s_per_image" in b
        }
        best = min(costs, key=costs.get)
        bound = cores / (decode["core_s_per_image"] + costs[best])
        report.update(
            decode=decode,
            backends=backends,
            best_backend=best,
            bound_images_per_s=bound,
        )

        with ready_ray(cores):
            report["ray_job"] = ray_job(_job_config(args, artifact, manifest, str(work / "out")))
        if not args.skip_baseline:
            torch.set_num_threads(default_threads)  # backend_costs pinned this process to 1 thread
            report["baseline"] = plain_pytorch(artifact, paths, args.batch_size, cores)
        job_rate = report["ray_job"]["images_per_s"]
        report["ratios"] = {"ray_job_vs_bound": job_rate / bound}
        # On a shared machine the wall-clock ratio also measures the neighbours. This one does
        # not: useful core-seconds per image (decode + best backend) / what the job spent per
        # image, i.e. the job's rate vs the bound scaled to the CPU share it actually got.
        report["ratios"]["ray_job_cpu_efficiency"] = (
            decode["core_s_per_image"] + costs[best]
        ) / report["ray_job"]["core_s_per_image"]
        if report["ray_job"].get("steady_images_per_s"):
            report["ratios"]["ray_job_steady_vs_bound"] = (
                report["ray_job"]["steady_images_per_s"] / bound
            )
        if "baseline" in report:
            report["ratios"]["ray_job_vs_baseline"] = job_rate / report["baseline"]["images_per_s"]
            report["ratios"]["bound_vs_baseline"] = bound / report["baseline"]["images_per_s"]
            # Load-independent: core-seconds per image the baseline spends / the job spends.
            report["ratios"]["ray_job_vs_baseline_cpu"] = (
                report["baseline"]["core_s_per_image"] / report["ray_job"]["core_s_per_image"]
            )
        report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0
