"""Shared helpers for the screening tests: a tiny real artifact, a phantom archive, subprocess runs."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from cxr_ray import testing
from cxr_ray.testing import CLASSES, IMAGE_SIZE  # noqa: F401 - the screening tests' names for them

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def make_artifact(
    directory: Path, *, name: str = "screen-test", seed: int = 0, thresholds: dict | None = None, onnx: bool = True
) -> str:
    """A real mobilenet_v2 artifact at 64 px (random weights, fixed seed), with its ONNX export as
    `cxr-ray export` writes it (actors then load the graph instead of exporting it)."""
    return str(testing.make_artifact(
        directory, name=name, seed=seed, positive_class="covid", onnx=onnx,
        thresholds=thresholds or {"positive": 0.3, "chosen_on": "validation"},
    ))


def make_archive(directory: Path, *, n: int = 40, corrupt_fraction: float = 0.25, seed: int = 3, size: int = 64,
                 s3_endpoint: str | None = None) -> pd.DataFrame:
    """A phantom archive (synth) with ``labels.csv``; returns labels with absolute ``uri``."""
    from cxr_ray.io.storage import join
    from cxr_ray.synth import generate_archive

    labels = generate_archive(str(directory), n=n, corrupt_fraction=corrupt_fraction, seed=seed, size=size,
                              s3_endpoint=s3_endpoint)
    labels = labels.copy()
    labels["uri"] = [join(str(directory), *p.split("/")) for p in labels["path"]]
    return labels


def screen_config(artifact, inputs, output, **overrides):
    """A small, fast ScreenConfig for tests (ONNX Runtime, one actor, 10-row parts); ``overrides`` win."""
    from cxr_ray.screen.config import ScreenConfig

    base = dict(
        model=artifact, inputs=inputs, output=str(output), backend="onnxruntime", batch_size=8,
        decode_batch_size=4, rows_per_part=10, actors=(1, 1), progress_every_s=0,
    )
    base.update(overrides)
    return ScreenConfig(**base)


def expected_status(code) -> str:
    from cxr_ray.screen.schema import status_for

    return status_for(None if pd.isna(code) else code)


def read_rows(output: str | Path, storage_options: dict | None = None) -> pd.DataFrame:
    """All rows under OUTPUT/parts, as a reader would load them (pandas + pyarrow)."""
    target = f"{str(output).rstrip('/')}/parts"
    return pd.read_parquet(target, storage_options=storage_options).sort_values("path").reset_index(drop=True)


def screen_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "cxr_ray", "screen", *args]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
        **extra,
    )
    return env


def run_tree(cmd: list[str], *, env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` that, on timeout, kills the command's whole process tree (its Ray too)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s\nstderr:\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_checked(cmd: list[str], *, env: dict, timeout: float, cwd: Path | None = None) -> tuple[dict, str]:
    """Run a screening command; return (summary JSON from stdout, stderr)."""
    proc = run_tree(cmd, env=env, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout), proc.stderr


def _psutil():
    """psutil: Ray ships it (ray/thirdparty_files, put on sys.path by ``import ray``)."""
    import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on sys.path

    psutil = importlib.import_module("psutil")

    return psutil


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """SIGKILL a process we started and every process below it (its local Ray), by pid."""
    psutil = _psutil()

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    psutil.wait_procs(procs[1:], timeout=30)  # the root is the caller's child: its Popen reaps it
    return [p.pid for p in procs]


def processes_with(marker: str) -> list:
    """Our processes whose command line mentions ``marker`` (a unique temp dir we created)."""
    psutil = _psutil()

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in (proc.info["cmdline"] or [])):
                found.append(proc)
    return found


def wait_for(predicate, timeout: float, every: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
