"""``cxr-ray screen`` / ``jobs/screen.py`` as a user runs them: a fresh process with its own local Ray.

Covers what an in-process test cannot: a real SIGKILL mid-run and the resume
after it, S3 input and output on a real S3 API (moto server), a worker that
crashes on one file, and stdout carrying nothing but the summary JSON.
"""

from __future__ import annotations

import json
import re
import subprocess

import boto3
import pyarrow.parquet as pq
import pytest
from _screen_testing import (
    PYTHON,
    REPO_ROOT,
    expected_status,
    kill_tree,
    make_archive,
    make_artifact,
    read_rows,
    run_checked,
    screen_cmd,
    subprocess_env,
    wait_for,
)

SMALL_BATCHES = ["--decode-batch-size", "2", "--batch-size", "2", "--actors", "1,1", "--progress-every", "0"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("cli-model") / "model")


def _check_rows(rows, labels):
    assert len(rows) == len(labels) and rows["path"].is_unique
    assert set(rows["path"]) == set(labels["uri"])
    want = {u: expected_status(e if c else None) for u, c, e in zip(labels["uri"], labels["corrupt"], labels["expected_error"], strict=True)}
    assert all(rows["status"] == rows["path"].map(want))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes_without_duplicates_or_gaps(artifact, tmp_path):
    labels = make_archive(tmp_path / "archive", n=60, corrupt_fraction=0.1, seed=7)
    out = tmp_path / "out"
    parts = out / "parts"
    cmd = screen_cmd("--model", artifact, "--input", str(tmp_path / "archive" / "images"), "--output", str(out),
                     "--rows-per-part", "4", *SMALL_BATCHES)
    env = subprocess_env()
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_for(lambda: parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir()),
                     timeout=240, what="the first committed part")
        finally:
            killed = kill_tree(proc.pid)  # the driver and its whole local Ray, SIGKILL, no goodbyes
            proc.wait(timeout=60)
    assert proc.returncode == -9 and len(killed) > 1
    assert not (out / "_SUCCESS").exists()
    committed = sorted(p for p in parts.iterdir() if p.suffix == ".parquet")
    before = sum(pq.read_metadata(p).num_rows for p in committed)  # every visible part is whole
    assert 0 < before < len(labels), "the kill came too late to test a resume"

    summary, _ = run_checked(cmd, env=env, timeout=300)
    rows = read_rows(out)
    _check_rows(rows, labels)
    assert summary["complete"] and (out / "_SUCCESS").exists()
    assert summary["resumed_rows"] >= before and summary["rows"] == len(labels)
    assert summary["screened_this_run"] == len(labels) - summary["resumed_rows"]
    assert len(summary["run_ids"]) == 2 and summary["duplicates_removed"] == 0
    assert not [p for p in parts.iterdir() if p.name.startswith(".")]  # the killed run's temporaries are gone


@pytest.mark.slow
def test_s3_input_and_output_through_the_job_script(artifact, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    labels = make_archive(f"s3://{bucket}/archive", n=24, corrupt_fraction=0.25, seed=9, s3_endpoint=endpoint)
    out = f"s3://{bucket}/results/run1"
    cmd = [PYTHON, str(REPO_ROOT / "jobs" / "screen.py"), "--model", artifact, "--input", f"s3://{bucket}/archive/images",
           "--output", out, "--s3-endpoint", endpoint, "--rows-per-part", "8", *SMALL_BATCHES]
    env = subprocess_env()
    summary, _ = run_checked(cmd, env=env, timeout=300)
    assert summary["complete"] and summary["rows"] == len(labels) and summary["output"] == out
    rows = read_rows(out, storage_options={"client_kwargs": {"endpoint_url": endpoint}})
    _check_rows(rows, labels)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="results/run1/")["Contents"]}
    assert {"results/run1/_SUCCESS", "results/run1/_summary.json"} <= keys
    assert json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key="results/run1/_summary.json")["Body"].read())["rows"] == len(labels)

    # Same command again: everything is already there; nothing is screened twice.
    again, _ = run_checked(cmd, env=env, timeout=300)
    assert again["complete"] and again["screened_this_run"] == 0 and again["rows"] == len(labels)


@pytest.mark.slow
def test_crashing_workers_lose_nothing(artifact, tmp_path):
    """A predict actor dies once (its batch is retried on the restarted actor) and one file kills
    the process decoding it on every attempt (it ends up as a ``worker_crashed`` row); the job completes."""
    labels = make_archive(tmp_path / "archive", n=16, corrupt_fraction=0.0, seed=2)
    poison = sorted(labels["uri"])[5]
    out = tmp_path / "out"
    marker = tmp_path / "actor-killed-once"
    cmd = screen_cmd("--model", artifact, "--input", str(tmp_path / "archive" / "images"), "--output", str(out),
                     "--rows-per-part", "4", "--max-retries", "1", *SMALL_BATCHES)
    env = subprocess_env(CXR_RAY_CHAOS_CRASH_ON=poison.rsplit("/", 1)[-1], CXR_RAY_CHAOS_KILL_ACTOR_ONCE=str(marker))
    summary, stderr = run_checked(cmd, env=env, timeout=400)
    rows = read_rows(out).set_index("path")
    assert marker.exists()  # the actor did die once
    assert summary["complete"] and summary["rows"] == len(labels) and summary["worker_crashed_rows"] == 1
    assert rows.loc[poison, "error_code"] == "worker_crashed" and rows.loc[poison, "status"] == "error"
    assert (rows.drop(index=poison)["status"] == "ok").all()
    assert "screening them one by one" in stderr
    # Only the batches in flight on the actor the poison file kept killing were lost in the first
    # pass (on CPU-only clusters the actors decode: Ray Data keeps 2 batches of 2 in flight per
    # actor, so <= 4 files); the batch of the actor that died once was retried, not dropped.
    run = json.loads((out / "_runs" / f"{summary['run_id']}.json").read_text())
    assert 1 <= run["passes"][0]["missing"] <= 4 and run["passes"][1]["name"] == "isolate"


PROGRESS_LINE = re.compile(
    r"^screen: (\d+)/(\d+) images \(100%\) \S+ images/s done in \S+ \| ok (\d+) error (\d+) skipped (\d+) flagged (\d+)$")


@pytest.mark.slow
def test_stderr_ends_with_one_progress_line_whose_total_is_the_input_count(artifact, tmp_path):
    """stderr is a pipe here, not a terminal: plain progress lines, the last one with the listing's total."""
    labels = make_archive(tmp_path / "archive", n=12, corrupt_fraction=0.25, seed=4)
    small = [a if a != "0" else "1" for a in SMALL_BATCHES]  # --progress-every 1: lines on
    cmd = screen_cmd("--model", artifact, "--input", str(tmp_path / "archive" / "images"),
                     "--output", str(tmp_path / "out"), "--rows-per-part", "4", *small)
    summary, stderr = run_checked(cmd, env=subprocess_env(), timeout=300)
    finals = [m for m in map(PROGRESS_LINE.match, stderr.splitlines()) if m]
    assert len(finals) == 1, stderr[-3000:]
    done, total, ok, error, skipped, flagged = map(int, finals[0].groups())
    assert done == total == len(labels) == summary["rows"]
    want = labels["expected_error"].where(labels["corrupt"], None).map(expected_status).value_counts()
    assert (ok, error, skipped) == (want.get("ok", 0), want.get("error", 0), want.get("skipped", 0))
    assert error + skipped > 0 and flagged == summary["flagged"]
    assert "\r" not in stderr  # not a terminal: lines, no carriage returns
