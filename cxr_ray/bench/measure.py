"""What the benchmarks measure with: cores available, CPU seconds of a process tree (random-weight
artifacts: :mod:`cxr_ray.bench.artifacts`, re-exported here)."""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on sys.path

from cxr_ray.bench.artifacts import BENCH_CLASSES, random_artifact

__all__ = ["BENCH_CLASSES", "CpuMeter", "cores", "random_artifact"]


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class CpuMeter:
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

    def report(self, images: int, wall: float) -> dict[str, Any]:
        return {
            "core_s_per_image": self.used / max(images, 1),
            # Our share of all cores' time, and how busy the machine was in all (us + others):
            # share << busy ~ 1.0 means the neighbours took the rest, not that we left it idle.
            "machine_share": self.used / (wall * cores()) if wall > 0 else None,
            "machine_busy": self.machine_busy,
        }
