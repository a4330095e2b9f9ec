"""CPU backends agree with eager PyTorch, fail the same way on bad input, and ``auto`` picks ONNX Runtime here."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cxr_ray.engines.base import Backend
from cxr_ray.engines.load import REDUCED_PRECISION_ATOL, load_backend, resolve_backend_name
from cxr_ray.engines.onnxruntime.runtime import OnnxRuntimeBackend
from cxr_ray.engines.registry import BACKEND_NAMES
from cxr_ray.engines.torch.runtime import TorchBackend, cpu_has_native_bf16
from cxr_ray.errors import ArtifactError, BackendUnavailableError, UsageError
from cxr_ray.models.artifact import ONNX_FILE, load_model
from cxr_ray.testing import CLASSES

SIZE = 64
ATOL = 1e-4  # on probabilities


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared 2-core box


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("artifact", name="backend-test", image_size=SIZE, onnx=True)


@pytest.fixture(scope="module")
def reference(artifact):
    """Eager PyTorch, NCHW, fp32: what every backend must reproduce."""
    model, _ = load_model(str(artifact))

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()

    return predict


def batch_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend(request, artifact) -> Backend:
    return load_backend(str(artifact), request.param, device="cpu", num_threads=1)


@pytest.mark.parametrize("n", [1, 5])
def test_backend_agrees_with_eager_pytorch(backend, reference, n):
    batch = batch_of(n, seed=n)
    got = backend.predict(batch)
    assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
    np.testing.assert_allclose(got, reference(batch), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_backend_rows_do_not_depend_on_batch_neighbours(backend):
    batch = batch_of(3, seed=7)
    together = backend.predict(batch)
    alone = np.concatenate([backend.predict(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "shape", [(2, 1, 32, 32), (2, 3, SIZE, SIZE), (1, SIZE, SIZE), (2, 1, SIZE, SIZE + 1)], ids=str
)
def test_wrong_shape_is_a_value_error(backend, shape):
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 1, 64, 64\)"):
        backend.predict(np.zeros(shape, dtype=np.float32))


def test_empty_batch_and_float64_input(backend, reference):
    assert backend.predict(np.zeros((0, 1, SIZE, SIZE), np.float32)).shape == (0, len(CLASSES))
    batch = batch_of(2, seed=3)
    np.testing.assert_allclose(backend.predict(batch.astype(np.float64)), reference(batch), atol=ATOL, rtol=0)


def test_describe(backend):
    info = backend.describe()
    assert info["backend"] == backend.name and info["classes"] == CLASSES and info["device"] == "cpu"
    assert info["precision"] == "fp32"  # CPU engines run fp32 whatever was asked for


def test_torch_backend_nchw_and_channels_last_agree(artifact, reference):
    model, card = load_model(str(artifact))
    nchw = TorchBackend(model, card.classes, card.image_size, channels_last=False)
    batch = batch_of(3, seed=11)
    np.testing.assert_allclose(nchw.predict(batch), reference(batch), atol=ATOL, rtol=0)
    assert nchw.describe()["channels_last"] is False


def test_torch_backend_precision_on_cpu(artifact, reference):
    model, card = load_model(str(artifact))
    assert TorchBackend(model, card.classes, card.image_size, precision="fp16").precision == "fp32"
    bf16 = TorchBackend(model, card.classes, card.image_size, precision="bf16")
    batch = batch_of(2, seed=5)
    np.testing.assert_allclose(bf16.predict(batch), reference(batch), atol=5e-2, rtol=0)  # bf16: ~3 digits
    with pytest.raises(ValueError, match="valid: fp32, fp16, bf16"):
        TorchBackend(model, card.classes, card.image_size, precision="int4")


def test_torch_backend_sets_threads(artifact):
    model, card = load_model(str(artifact))
    TorchBackend(model, card.classes, card.image_size, num_threads=2)
    assert torch.get_num_threads() == 2  # the autouse fixture restores the setting


def test_auto_picks_onnxruntime_on_this_machine(artifact):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: auto picks tensorrt here")
    if importlib.util.find_spec("openvino") is not None:
        pytest.skip("OpenVINO is installed: auto picks openvino here (tests/test_openvino.py)")
    assert resolve_backend_name("auto") == "onnxruntime"
    backend = load_backend(str(artifact), num_threads=1)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.describe()["device"] == "cpu"
    assert resolve_backend_name("auto", device="cpu") == "onnxruntime"


def test_unknown_backend_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'onnxruntime'"):
        resolve_backend_name("onnxrutime")
    assert BACKEND_NAMES == ("auto", "tensorrt", "onnxruntime", "torch", "onnxruntime-trt", "openvino")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_says_how_to_install(artifact):
    with pytest.raises(BackendUnavailableError, match="pypi.nvidia.com"):
        load_backend(str(artifact), "tensorrt")


def test_tampered_onnx_is_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / ONNX_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the recorded"):
        load_backend(str(copy), "onnxruntime", num_threads=1)


def test_cuda_device_without_gpu_is_refused(artifact):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        load_backend(str(artifact), "torch", device="cuda")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        load_backend(str(artifact), "onnxruntime", device="cuda")


@pytest.mark.gpu
def test_torch_cuda_fp16_agrees(artifact, reference):
    backend = load_backend(str(artifact), "torch", device="cuda", precision="fp16")
    batch = batch_of(4, seed=2)
    np.testing.assert_allclose(backend.predict(batch), reference(batch), atol=1e-2, rtol=0)


# ---------------------------------------------------------------- precision policy

NATIVE_BF16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no AVX512-BF16 / AMX: bf16 is refused here (tested below)"
)


def test_unsupported_precision_pairs_are_usage_errors(artifact):
    with pytest.raises(UsageError, match="onnxruntime runs fp32 only"):
        load_backend(str(artifact), "onnxruntime", device="cpu", precision="bf16")
    with pytest.raises(UsageError, match="fp16 on the CPU is slower"):
        load_backend(str(artifact), "torch", device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="int8 needs a calibrated TensorRT engine"):
        load_backend(str(artifact), "torch", device="cpu", precision="int8")
    with pytest.raises(UsageError, match="valid: auto, fp32, fp16, bf16, int8"):
        load_backend(str(artifact), "auto", device="cpu", precision="fp8")


def test_auto_precision_is_fp32_on_the_cpu(artifact, reference):
    backend = load_backend(str(artifact), "torch", device="cpu")
    assert backend.precision == "fp32" and backend.label == "torch"
    batch = batch_of(2, seed=9)
    np.testing.assert_allclose(backend.predict(batch), reference(batch), atol=ATOL, rtol=0)


@NATIVE_BF16
def test_bf16_on_the_cpu_is_torch_checked_against_fp32(artifact, reference):
    backend = load_backend(str(artifact), "torch", device="cpu", precision="bf16")
    assert backend.name == "torch" and backend.precision == "bf16" and backend.label == "torch-bf16"
    diff = backend.describe()["verified_max_abs_diff_vs_fp32"]
    assert 0 < diff <= REDUCED_PRECISION_ATOL  # bf16 is not exact, and within the accepted tolerance
    batch = batch_of(3, seed=4)
    np.testing.assert_allclose(backend.predict(batch), reference(batch), atol=REDUCED_PRECISION_ATOL, rtol=0)


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU has bf16 instructions: the refusal cannot happen here")
def test_bf16_is_refused_where_it_would_be_emulated(artifact):
    with pytest.raises(BackendUnavailableError, match="would be emulated"):
        load_backend(str(artifact), "auto", device="cpu", precision="bf16")


def test_reduced_precision_above_tolerance_is_refused(artifact):
    model, card = load_model(str(artifact))
    bf16 = TorchBackend(model, card.classes, card.image_size, precision="bf16")  # emulated or native: same check
    with pytest.raises(BackendUnavailableError, match=r"differs from fp32 by .* use precision fp32"):
        bf16.verify_against_fp32(atol=0.0)
    fp32 = TorchBackend(model, card.classes, card.image_size)
    assert fp32.verify_against_fp32(atol=0.0) == 0.0  # nothing to compare: fp32 is the reference
