"""Shared fixtures: one real local Ray cluster per session (started only when a
test asks for it), the real sample X-rays, a real S3 API on loopback (moto's
server mode), tiny real artifacts (``artifact_factory``), one torch thread,
and the GPU / TensorRT markers. Helpers shared with the benchmarks live in
:mod:`cxr_ray.testing`."""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from pathlib import Path

import pytest

from cxr_ray.testing import make_artifact, torch_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXR_RAY_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip GPU-only tests visibly, with the reason, instead of faking them."""
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here")
    skip_trt = pytest.mark.skip(
        reason=f"needs TensorRT and a CUDA GPU (tensorrt importable: {has_trt}, CUDA: {has_cuda})"
    )
    for item in items:
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep artifact copies and cached ONNX exports of the tests out of ~/.cache.

    Set before the session's Ray cluster starts, so its workers inherit it too.
    """
    saved = os.environ.get("CXR_RAY_CACHE")
    os.environ["CXR_RAY_CACHE"] = str(tmp_path_factory.mktemp("cxr-ray-cache"))
    yield
    if saved is None:
        os.environ.pop("CXR_RAY_CACHE", None)
    else:
        os.environ["CXR_RAY_CACHE"] = saved


@pytest.fixture()
def one_torch_thread():
    """One torch thread for each test of a module that asks (``pytestmark = usefixtures(...)``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """One torch thread for a whole module, module-scoped fixtures included."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory):
    """``artifact_factory(label, **options)``: a tiny real artifact in a fresh directory
    (see :func:`cxr_ray.testing.make_artifact` for the options)."""

    def make(label: str = "model", **options):
        return make_artifact(tmp_path_factory.mktemp(label) / "model", **options)

    return make


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``../shared/data/real`` (real sample X-rays), or skip with the reason."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real sample X-rays not found at {REAL_DATA} (set CXR_RAY_REAL_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session, started on first use."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another cluster on this machine (e.g. a `ray start` test)
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
        )
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server mode). Yields the endpoint URL.

    Credentials are dummy values exported through the standard AWS variables,
    which is exactly how users configure s3fs / boto3 against a real bucket.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; yields ``(endpoint, bucket_name)``."""
    import boto3

    name = "cxr-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return s3_server, name


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc (DICOMweb plugin on) on 127.0.0.1 for the session, or skip with the reason."""
    from _orthanc import missing_reason, start_orthanc

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()
