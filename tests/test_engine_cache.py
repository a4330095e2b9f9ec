"""Engine cache: keys, records with sha256, tamper refusal and build-once locking (no TensorRT needed).

A callback writing bytes stands in for the TensorRT builder: the caching and
locking logic is the same whichever builder produces the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cxr_ray.engines.cache import (
    compute_capability_tag,
    engine_key,
    file_lock,
    find_engine,
    get_or_build_engine,
    verify_engine_file,
)
from cxr_ray.errors import ArtifactError
from cxr_ray.models.artifact import ENGINES_DIR, load_card, write_card
from cxr_ray.models.card import new_card

REPO = Path(__file__).resolve().parents[1]
KEY = "sm90-trt10.3.0-fp16-b1-32-32-64"


@pytest.fixture()
def artifact(tmp_path) -> Path:
    """A card is all the cache needs (it never touches the weights)."""
    root = tmp_path / "artifact"
    root.mkdir()
    write_card(root, new_card(name="cache-test", arch="mobilenet_v2", classes=["a", "b"], image_size=64))
    return root


def test_engine_key_composition():
    key = engine_key(compute_capability=(9, 0), trt_version="10.3.0", precision="fp16",
                     min_batch=1, opt_batch=32, max_batch=64, image_size=224)
    assert key == "sm90-trt10.3.0-fp16-b1-32-64-224"
    assert engine_key(compute_capability="8.6", trt_version="10.0.1.6", precision="int8",
                      min_batch=2, opt_batch=2, max_batch=2, image_size=64) == "sm86-trt10.0.1.6-int8-b2-2-2-64"
    # Every ingredient changes the key: an engine is only valid for all of them.
    base = dict(compute_capability=(8, 0), trt_version="10.3.0", precision="fp16",
                min_batch=1, opt_batch=8, max_batch=8, image_size=224)
    variants = [dict(compute_capability=(8, 9)), dict(trt_version="10.4.0"), dict(precision="fp32"),
                dict(min_batch=2), dict(opt_batch=4), dict(max_batch=16), dict(image_size=256)]
    keys = {engine_key(**{**base, **change}) for change in variants} | {engine_key(**base)}
    assert len(keys) == len(variants) + 1


@pytest.mark.parametrize(("value", "tag"), [((9, 0), "sm90"), ("8.6", "sm86"), ("sm_75", "sm75"), ("sm120", "sm120"),
                                            ((12, 0), "sm120")])
def test_compute_capability_tag(value, tag):
    assert compute_capability_tag(value) == tag


@pytest.mark.parametrize(
    ("change", "message"),
    [({"precision": "int4"}, "valid: fp32, fp16, int8"), ({"min_batch": 0}, "1 <= min"),
     ({"opt_batch": 64}, "1 <= min"), ({"trt_version": "10/../x"}, "file name"),
     ({"compute_capability": "ampere"}, "compute capability")],
)
def test_engine_key_rejects_bad_values(change, message):
    args = dict(compute_capability=(9, 0), trt_version="10.3.0", precision="fp16",
                min_batch=1, opt_batch=32, max_batch=32, image_size=64)
    with pytest.raises(ValueError, match=message):
        engine_key(**{**args, **change})


def fake_builder(payload: bytes, calls: list | None = None, delay: float = 0.0):
    def build(path: Path) -> dict:
        if calls is not None:
            calls.append(path)
        time.sleep(delay)
        path.write_bytes(payload)
        return {"precision": "fp16", "max_abs_diff": 0.001}

    return build


def test_build_once_then_found_with_sha256_recorded(artifact):
    calls: list = []
    record, built = get_or_build_engine(artifact, KEY, fake_builder(b"plan-v1", calls), onnx_sha256="abc")
    assert built and len(calls) == 1
    assert record["file"] == f"{ENGINES_DIR}/{KEY}.plan" and (artifact / record["file"]).read_bytes() == b"plan-v1"
    assert record["sha256"] == hashlib.sha256(b"plan-v1").hexdigest()
    assert record["precision"] == "fp16" and record["onnx_sha256"] == "abc"
    assert load_card(str(artifact)).engines == [record]

    again, built_again = get_or_build_engine(artifact, KEY, fake_builder(b"other", calls), onnx_sha256="abc")
    assert not built_again and again == record and len(calls) == 1
    assert verify_engine_file(artifact / record["file"], record["sha256"]) == b"plan-v1"
    assert not list((artifact / ENGINES_DIR).glob(".*tmp*"))


def test_engine_of_another_onnx_graph_is_not_reused(artifact):
    get_or_build_engine(artifact, KEY, fake_builder(b"plan-for-a"), onnx_sha256="a")
    assert find_engine(artifact, KEY, onnx_sha256="b") is None
    record, built = get_or_build_engine(artifact, KEY, fake_builder(b"plan-for-b"), onnx_sha256="b")
    assert built and record["onnx_sha256"] == "b"
    assert [r["onnx_sha256"] for r in load_card(str(artifact)).engines] == ["b"]  # replaced, not duplicated


def test_tampered_engine_is_refused_before_loading(artifact):
    record, _ = get_or_build_engine(artifact, KEY, fake_builder(b"genuine plan"))
    path = artifact / record["file"]
    path.write_bytes(b"genuine plaN")
    with pytest.raises(ArtifactError, match="does not match the recorded"):
        verify_engine_file(path, record["sha256"])
    with pytest.raises(ArtifactError, match="no sha256 recorded"):
        verify_engine_file(path, "")
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_engine_file(path, record["sha256"])


def test_failed_build_records_nothing_and_releases_the_lock(artifact):
    def broken(path: Path) -> dict:
        path.write_bytes(b"half a plan")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        get_or_build_engine(artifact, KEY, broken)
    assert load_card(str(artifact)).engines == []
    assert not list((artifact / ENGINES_DIR).glob(f"*{KEY}*"))
    with pytest.raises(ArtifactError, match="produced no plan"):
        get_or_build_engine(artifact, KEY, lambda path: None)
    record, built = get_or_build_engine(artifact, KEY, fake_builder(b"ok"), lock_timeout=5)
    assert built and record["sha256"] == hashlib.sha256(b"ok").hexdigest()


def test_threads_build_once(artifact):
    calls: list = []
    results: list = []

    def worker():
        results.append(get_or_build_engine(artifact, KEY, fake_builder(b"plan", calls, delay=0.5)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1 and len(results) == 4
    assert sorted(built for _, built in results) == [False, False, False, True]
    assert len({record["sha256"] for record, _ in results}) == 1


WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from cxr_ray.engines.cache import get_or_build_engine

    artifact, key, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def build(path):
        with open(log, "a") as handle:
            handle.write(f"build {os.getpid()}\\n")
        time.sleep(1.5)  # long enough for the other process to reach the lock
        path.write_bytes(b"plan from " + str(os.getpid()).encode())
        return {}

    record, built = get_or_build_engine(artifact, key, build)
    print(json.dumps({"built": built, "sha256": record["sha256"]}))
    """
)


def test_two_processes_build_once(artifact, tmp_path):
    """Two real processes (two Ray actors on a node): one builds, the other waits and finds it."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "builds.log"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(artifact), KEY, str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert log.read_text().count("build ") == 1
    assert sorted(o["built"] for o in outputs) == [False, True]
    assert outputs[0]["sha256"] == outputs[1]["sha256"]
    assert len(load_card(str(artifact)).engines) == 1


def test_file_lock_times_out_while_held(tmp_path):
    lock = tmp_path / "engines" / ".lock"
    with file_lock(lock):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="could not lock"), file_lock(lock, timeout=0.3):
            pass
        assert time.monotonic() - start >= 0.3
    with file_lock(lock, timeout=0.3):  # released: taken at once
        pass
