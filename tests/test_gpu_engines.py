"""The GPU side of the engines, as far as a CPU can check it: ``auto``'s order from the registry,
the ONNX Runtime GPU providers' refusals, the torch engine's device-tensor path; and, marked
``gpu`` (skipped with the reason where torch sees no GPU), fp16 / CUDA graphs against fp32."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from cxr_ray.engines.load import load_backend, resolve_backend_name
from cxr_ray.engines.onnxruntime.runtime import (
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    cuda_provider_available,
    providers_for,
    tensorrt_provider_available,
)
from cxr_ray.engines.openvino.runtime import openvino_available
from cxr_ray.engines.registry import BACKEND_NAMES, auto_candidates, get_engine
from cxr_ray.engines.torch.runtime import TorchBackend
from cxr_ray.errors import BackendUnavailableError, UsageError
from cxr_ray.models.artifact import load_model

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the CPU-only answer differs")


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("gpu-engines", name="gpu-engine-test", image_size=SIZE, onnx=True)


def batch_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, SIZE, SIZE), dtype=np.float32)


def test_auto_order_is_the_registrys():
    assert [e.name for e in auto_candidates(on_gpu=True)] == ["tensorrt", "onnxruntime-trt", "onnxruntime", "torch"]
    assert [e.name for e in auto_candidates(on_gpu=False)] == ["openvino", "onnxruntime", "torch"]
    assert all(e.gpu_probe for e in auto_candidates(on_gpu=True))
    assert not any(e.gpu_only for e in auto_candidates(on_gpu=False))


def test_gpu_precision_rules():
    # auto on a GPU: fp16 wherever the engine has it; ONNX Runtime's CUDA provider only runs fp32
    assert get_engine("onnxruntime-trt").resolve_precision("auto", on_cpu=False) == "fp16"
    assert get_engine("onnxruntime").resolve_precision("auto", on_cpu=False) == "fp32"
    assert not get_engine("onnxruntime").runs("fp16", on_cpu=False)
    assert get_engine("torch").resolve_precision("auto", on_cpu=False) == "fp16"
    assert not get_engine("onnxruntime-trt").runs("bf16", on_cpu=False)
    assert get_engine("torch").runs("bf16", on_cpu=False)


@NO_GPU
def test_auto_on_a_cpu_machine():
    first = "openvino" if openvino_available() else "onnxruntime"  # OpenVINO only where it is installed
    assert resolve_backend_name("auto") == first
    assert resolve_backend_name("auto", device="cuda") == first  # no GPU visible: the CPU's order
    assert resolve_backend_name("auto", precision="bf16") == ("openvino" if openvino_available() else "torch")
    with pytest.raises(UsageError, match="openvino .CPU plugin. runs fp32, bf16"):
        resolve_backend_name("auto", precision="fp16")  # nothing runs fp16 on a CPU: the first one says why


def test_serve_config_names_every_engine():
    from cxr_ray.serve.config import BackendName

    assert typing.get_args(BackendName) == BACKEND_NAMES


@NO_GPU
def test_gpu_providers_refuse_without_a_gpu(artifact):
    assert not cuda_provider_available() and not tensorrt_provider_available()
    with pytest.raises(UsageError, match="TensorRT provider runs on CUDA devices only"):
        providers_for("cpu", execution="tensorrt")
    with pytest.raises(UsageError, match="TensorRT provider runs on CUDA devices only"):
        load_backend(str(artifact), "onnxruntime-trt", device="cpu")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        load_backend(str(artifact), "onnxruntime-trt")


def test_providers_for_cuda_turn_tf32_off_and_keep_the_trt_cache_off(monkeypatch):
    # What the session is given, computed with ONNX Runtime reporting the GPU providers as installed.
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: [TENSORRT_PROVIDER, CUDA_PROVIDER, "CPUExecutionProvider"])
    cuda = providers_for("cuda:1")
    assert cuda == [(CUDA_PROVIDER, {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]
    trt = providers_for("cuda", execution="tensorrt", fp16=True)
    assert trt[0] == (TENSORRT_PROVIDER, {"device_id": 0, "trt_fp16_enable": True, "trt_engine_cache_enable": False})
    assert trt[1:] == [(CUDA_PROVIDER, {"device_id": 0, "use_tf32": 0}), "CPUExecutionProvider"]


def test_torch_predict_tensor_equals_predict(artifact):
    model, card = load_model(str(artifact))
    backend = TorchBackend(model, card.classes, card.image_size)
    batch = batch_of(3, seed=1)
    np.testing.assert_array_equal(backend.predict_tensor(torch.from_numpy(batch)), backend.predict(batch))
    assert backend.predict_tensor(torch.zeros(0, 1, SIZE, SIZE)).shape == (0, len(card.classes))
    with pytest.raises(ValueError, match="expected a batch of shape"):
        backend.predict_tensor(torch.zeros(2, 3, SIZE, SIZE))


def test_default_predict_tensor_goes_through_the_host(artifact):
    onnx = load_backend(str(artifact), "onnxruntime", device="cpu", num_threads=1)
    batch = batch_of(2, seed=3)
    np.testing.assert_array_equal(onnx.predict_tensor(torch.from_numpy(batch)), onnx.predict(batch))


def test_cuda_graphs_need_cuda(artifact):
    model, card = load_model(str(artifact))
    with pytest.raises(UsageError, match="CUDA graphs need a CUDA device"):
        TorchBackend(model, card.classes, card.image_size, device="cpu", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_fp16_is_checked_against_fp32_at_load(artifact, graphs):
    backend = load_backend(str(artifact), "torch", device="cuda", precision="fp16", cuda_graphs=graphs)
    info = backend.describe()
    assert backend.label == "torch-fp16" and 0 < info["verified_max_abs_diff_vs_fp32"] <= 2e-2
    assert (info["cuda_graphs"] is not None) == graphs
    model, card = load_model(str(artifact))
    reference = TorchBackend(model, card.classes, card.image_size, device="cpu")
    batch = batch_of(8, seed=4)
    np.testing.assert_allclose(backend.predict(batch), reference.predict(batch), atol=2e-2, rtol=0)
    on_device = torch.from_numpy(batch).cuda()
    np.testing.assert_allclose(backend.predict_tensor(on_device), backend.predict(batch), atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_auto_on_a_gpu_is_not_the_cpus_engine(artifact):
    backend = load_backend(str(artifact))
    assert backend.name in ("tensorrt", "onnxruntime-trt", "torch")
    assert "cuda" in str(backend.describe()["device"])
