"""`cxr-ray demo` end to end, as a new user runs it (own process, own local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_parquet(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_ray", "demo", "--out", str(out), "--n", "120", "--epochs", "3"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # stdout is exactly one JSON document
    for stage in ("[1/6] synth", "[2/6] train", "[3/6] export", "[4/6] screen", "[5/6] serve"):
        assert stage in proc.stderr
    # Ray's own INFO logging goes to the session's log files, not the console (cxr_ray/console.py)
    for ray_info in ("streaming_executor.py", "logging_progress.py", "Started a local Ray instance", "Started Serve"):
        assert ray_info not in proc.stderr, ray_info
    labels = pd.read_csv(out / "archive" / "labels.csv")
    frame = pd.read_parquet(summary["screen_output"])
    assert len(frame) == len(labels) == summary["screen_summary"]["rows"]
    assert set(frame["path"].str.rsplit("/", n=1).str[-1]) == set(labels["path"].str.rsplit("/", n=1).str[-1])
    corrupt = labels["corrupt"].astype(bool)
    assert (frame["status"] != "ok").sum() == corrupt.sum() > 0
    assert summary["onnx"]["max_abs_diff"] < 1e-3
    query = summary["serve_query"]
    assert query["status"] == 200 and query["response"]["label"] in {"covid", "pneumonia", "normal"}
    assert query["response"]["heatmap_png_base64_chars"] > 0
