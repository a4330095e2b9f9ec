"""``cxr-ray bench screen --memory-check``: peak memory (summed PSS of the driver and its Ray) at 1,000 vs 10,000 inputs."""

from __future__ import annotations

import contextlib
import importlib
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_ray.bench.screen_job import job_config, ray_job, ready_ray


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
            config = job_config(args, artifact, str(archive), str(work / f"out-mem-{n}"))
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
