"""Screening on a real multi-process Ray: a simulated two-node cluster, and ``ray job submit``.

Both need a Ray instance of their own (not the session's), so both run in
subprocesses. The ``ray start`` cluster is stopped by killing exactly the
processes it started (found by its unique temp dir and GCS port), not with
``ray stop``, which stops every Ray on the machine, other users' included.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
from _screen_testing import (
    PYTHON,
    REPO_ROOT,
    _psutil,
    expected_status,
    make_archive,
    make_artifact,
    processes_with,
    read_rows,
    run_tree,
    subprocess_env,
)

RAY = str(Path(PYTHON).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("cluster-model") / "model")


def _check(out: Path, labels, summary: dict) -> None:
    rows = read_rows(out)
    assert summary["complete"] and summary["rows"] == len(labels) and (out / "_SUCCESS").exists()
    assert rows["path"].is_unique and set(rows["path"]) == set(labels["uri"])
    want = {u: expected_status(e if c else None) for u, c, e in zip(labels["uri"], labels["corrupt"], labels["expected_error"], strict=True)}
    assert all(rows["status"] == rows["path"].map(want))


TWO_NODES = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from cxr_ray.screen.config import ScreenConfig
    from cxr_ray.screen.job import run_screen

    model, inputs, output = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # 1.5 CPU per actor: two actors cannot share a 2-CPU node, so the job only
        # finishes if the pool really uses both nodes.
        config = ScreenConfig(model=model, inputs=[inputs], output=output, backend="onnxruntime",
                              actors=(2, 2), cpus_per_actor=1.5, decode_cpus=0.25, batch_size=4,
                              decode_batch_size=4, rows_per_part=6, progress_every_s=0)
        summary = run_screen(config)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("SUMMARY " + json.dumps(summary))
    """
)


@pytest.mark.slow
def test_two_node_cluster_screens_everything(artifact, tmp_path):
    labels = make_archive(tmp_path / "archive", n=24, corrupt_fraction=0.25, seed=13)
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    out = tmp_path / "out"
    proc = run_tree(
        [PYTHON, str(script), artifact, str(tmp_path / "archive" / "labels.csv"), str(out)],
        env=subprocess_env(), timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    _check(out, labels, summary)


@pytest.fixture()
def ray_head(tmp_path):
    """``ray start --head`` with a dashboard, token auth on, every port chosen free; killed by pid after."""
    temp_dir = tempfile.mkdtemp(prefix="cxrj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Ray 2.60 local clusters use token auth. Every Ray command then needs RAY_AUTH_MODE=token
    # and the token (RAY_AUTH_TOKEN, or a file at RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token);
    # without them `ray job submit` gets "401 Unauthorized: Missing authentication token".
    # A fresh token in the environment keeps the test away from ~/.ray.
    env = subprocess_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    cmd = [
        RAY, "start", "--head", "--num-cpus", "2", "--port", str(gcs_port),
        "--include-dashboard=true", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--ray-client-server-port", str(_free_port()), "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-4000:]
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        _stop_cluster(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    psutil = _psutil()
    procs = {}
    for root in processes_with(temp_dir) + processes_with(f":{gcs_port}"):
        procs[root.pid] = root
        with contextlib.suppress(psutil.Error):
            procs.update({child.pid: child for child in root.children(recursive=True)})
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(procs.values()), timeout=30)


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_script_end_to_end(artifact, ray_head, tmp_path):
    address, env = ray_head
    labels = make_archive(tmp_path / "archive", n=16, corrupt_fraction=0.25, seed=17)
    out = tmp_path / "out"
    entrypoint = [
        PYTHON, str(REPO_ROOT / "jobs" / "screen.py"), "--model", artifact,
        "--input", str(tmp_path / "archive" / "labels.csv"), "--output", str(out),
        "--rows-per-part", "8", "--batch-size", "4", "--decode-batch-size", "4", "--progress-every", "0",
    ]
    proc = run_tree([RAY, "job", "submit", "--address", address, "--", *entrypoint], env=env, timeout=400, cwd=REPO_ROOT)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs, logs[-6000:]
    summary = json.loads((out / "_summary.json").read_text())
    _check(out, labels, summary)
    assert '"complete": true' in logs  # the job printed its summary (ray job logs shows it)
