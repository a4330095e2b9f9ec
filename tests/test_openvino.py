"""The OpenVINO engine on the CPU: real OpenVINO (and NNCF for int8), checked against ONNX Runtime fp32.

Skipped, with the reason, where ``openvino`` is not installed (``pip install 'cxr-ray[openvino]'``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'cxr-ray[openvino]')")

from cxr_ray.bench import backends as bench  # noqa: E402 - after the skip: these need openvino to mean anything
from cxr_ray.engines.contract import tolerance  # noqa: E402
from cxr_ray.engines.load import load_backend  # noqa: E402
from cxr_ray.engines.onnxruntime.runtime import OnnxRuntimeBackend  # noqa: E402
from cxr_ray.engines.openvino.runtime import OpenVinoBackend  # noqa: E402
from cxr_ray.engines.preflight import check_engine  # noqa: E402
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16  # noqa: E402
from cxr_ray.engines.verify import EngineVerificationError  # noqa: E402
from cxr_ray.errors import BackendUnavailableError, UsageError  # noqa: E402
from cxr_ray.synth.archive import generate_archive  # noqa: E402
from cxr_ray.testing import CLASSES  # noqa: E402

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared 2-core box


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    # As in test_backends: the seeded random network whose bf16 outputs stay within the 0.02 limit.
    return str(artifact_factory("openvino", name="openvino-test", image_size=SIZE, positive_class="covid", onnx=True))


@pytest.fixture(scope="module")
def onnxruntime_fp32(artifact):
    return load_backend(artifact, "onnxruntime", device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small real labelled set (phantom PNG / DICOM files and labels.csv)."""
    root = tmp_path_factory.mktemp("ov-labelled")
    generate_archive(str(root), n=24, formats=("png", "dcm"), size=128, seed=3)
    return str(root / "labels.csv")


def batch_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, SIZE, SIZE), dtype=np.float32)


def test_fp32_matches_onnxruntime_and_records_its_check(artifact, onnxruntime_fp32):
    backend = load_backend(artifact, "openvino", device="cpu", num_threads=1)
    assert isinstance(backend, OpenVinoBackend) and backend.label == "openvino"
    info = backend.describe()
    assert info["inference_precision_hint"] == "f32"  # never the CPU plugin's bf16 default on bf16 CPUs
    assert info["verification"]["reference"] == "onnxruntime"
    assert info["verification"]["max_abs_diff"] <= tolerance("openvino", "fp32") == info["verification"]["atol"]
    for n in (1, 5):
        batch = batch_of(n, seed=n)
        got = backend.predict(batch)
        assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
        np.testing.assert_allclose(got, onnxruntime_fp32.predict(batch), atol=1e-4, rtol=0)
    assert backend.predict(np.zeros((0, 1, SIZE, SIZE), np.float32)).shape == (0, len(CLASSES))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 1, 64, 64\)"):
        backend.predict(np.zeros((2, 1, 32, 32), np.float32))


def test_labelled_set_adds_real_images_and_an_auc_check(artifact, labelled, onnxruntime_fp32):
    backend = load_backend(artifact, "openvino", device="cpu", num_threads=1, verify_labels=labelled, verify_images=16)
    check = backend.verification
    assert check is not None and check["real_images"]["images"] == 16 and check["max_abs_diff_real"] <= 1e-4
    auc = check["auc"]
    assert auc["images"] == 16 and auc["limit"] == 0.005
    if auc["engine"] is not None:  # both classes of the positive-vs-rest split are in the sample
        assert abs(auc["change"]) <= 0.005 and 0.0 <= auc["reference"] <= 1.0


def test_auto_picks_openvino_when_it_passes(artifact):
    assert load_backend(artifact, "auto", num_threads=1).name == "openvino"
    check_engine("auto", "fp32", gpus=0)
    check_engine("openvino", "fp32", gpus=0)


def test_auto_falls_back_to_onnxruntime_when_the_check_fails(artifact, caplog):
    """A tolerance of 0: OpenVINO's kernels differ from ONNX Runtime's in the last bits, so the check fails."""
    diff = load_backend(artifact, "openvino", device="cpu", num_threads=1).verification["max_abs_diff"]
    if diff == 0.0:
        pytest.skip("OpenVINO matched ONNX Runtime bit for bit here: a tolerance of 0 cannot fail")
    with pytest.raises(EngineVerificationError, match=r"probabilities differ by up to .* \(> 0\)"):
        load_backend(artifact, "openvino", device="cpu", num_threads=1, max_prob_diff=0.0)
    with caplog.at_level(logging.WARNING, logger="cxr_ray.engines.load"):
        backend = load_backend(artifact, "auto", num_threads=1, max_prob_diff=0.0)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.label == "onnxruntime"
    lines = [r.getMessage() for r in caplog.records if r.name == "cxr_ray.engines.load"]
    assert len(lines) == 1 and "openvino not used" in lines[0] and "falling back to onnxruntime" in lines[0]


def _logsumexp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """How fold ensembles used to combine their members: its exported ReduceLogSumExp(axes=[0]) is read
    by OpenVINO 2026.4's ONNX frontend as a reduction over every axis, and the graph does not convert."""
    log_probs = [torch.log_softmax(m(x) / self.temperatures[i], dim=1) for i, m in enumerate(self.members)]
    return torch.logsumexp(torch.stack(log_probs, dim=0), dim=0) - math.log(len(log_probs))


def test_a_graph_openvino_cannot_convert_falls_back_under_auto(tmp_path, caplog, monkeypatch):
    """``auto`` must serve a graph OpenVINO cannot convert with ONNX Runtime; ``openvino`` refuses clearly."""
    from cxr_ray.models.ensemble import FoldEnsemble
    from cxr_ray.testing import make_artifact, seeded_model

    members = [seeded_model("mobilenet_v2", CLASSES, seed=seed, calibrate_bn_at=SIZE) for seed in (1, 2)]
    with monkeypatch.context() as patch:  # exported the old way; the weights and the loader are today's
        patch.setattr(FoldEnsemble, "forward", _logsumexp_forward)
        path = str(make_artifact(tmp_path / "model", name="ensemble", positive_class="covid", onnx=True,
                                 image_size=SIZE, model=FoldEnsemble(members, [0.5, 2.0]).eval(),
                                 card_fields={"ensemble": {"members": 2, "temperatures": [0.5, 2.0]}}))
    try:
        load_backend(path, "openvino", device="cpu", num_threads=1)
    except BackendUnavailableError as exc:
        assert "OpenVINO cannot convert this graph" in str(exc)
    else:
        pytest.skip("this OpenVINO converts ReduceLogSumExp: no graph here to fall back from")
    with caplog.at_level(logging.WARNING, logger="cxr_ray.engines.load"):
        backend = load_backend(path, "auto", num_threads=1)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert any("openvino not used" in r.getMessage() for r in caplog.records)


def test_a_fold_ensemble_runs_on_openvino_like_onnxruntime(tmp_path):
    """The default ``--folds K`` artifact (members' calibrated softmaxes averaged in one graph) converts,
    and OpenVINO fp32 gives ONNX Runtime's probabilities."""
    from cxr_ray.models.ensemble import FoldEnsemble
    from cxr_ray.testing import make_artifact, seeded_model

    members = [seeded_model("mobilenet_v2", CLASSES, seed=seed, calibrate_bn_at=SIZE) for seed in (1, 2)]
    path = str(make_artifact(tmp_path / "model", name="ensemble", positive_class="covid", onnx=True, image_size=SIZE,
                             model=FoldEnsemble(members, [0.5, 2.0]).eval(),
                             card_fields={"ensemble": {"members": 2, "temperatures": [0.5, 2.0]}}))
    openvino = load_backend(path, "openvino", device="cpu", num_threads=1)
    assert isinstance(openvino, OpenVinoBackend)
    assert load_backend(path, "auto", num_threads=1).label == "openvino"
    batch = batch_of(5, seed=4)
    reference = load_backend(path, "onnxruntime", device="cpu", num_threads=1).predict(batch)
    np.testing.assert_allclose(openvino.predict(batch), reference, atol=tolerance("openvino", "fp32"), rtol=0)
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-5)


def test_bf16_only_where_the_cpu_has_it(artifact, onnxruntime_fp32):
    if not cpu_has_native_bf16():
        with pytest.raises(BackendUnavailableError, match="no AVX512-BF16 or AMX"):
            load_backend(artifact, "openvino", device="cpu", precision="bf16")
        return
    backend = load_backend(artifact, "openvino", device="cpu", num_threads=1, precision="bf16")
    assert backend.label == "openvino-bf16" and backend.describe()["inference_precision_hint"] == "bf16"
    batch = batch_of(3, seed=11)
    np.testing.assert_allclose(backend.predict(batch), onnxruntime_fp32.predict(batch), atol=2e-2, rtol=0)


def test_int8_is_calibrated_and_checked_on_real_images(artifact, labelled):
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'cxr-ray[openvino]')")
    with pytest.raises(UsageError, match="calibrated on real images"):
        load_backend(artifact, "openvino", device="cpu", precision="int8")
    # A random-initialised network is no test of int8 accuracy, so the limit here is loose; the check's
    # figures are what is tested: computed on the real calibration images, not on noise.
    backend = load_backend(artifact, "openvino", device="cpu", num_threads=1, precision="int8",
                           calibration=labelled, calibration_images=8, max_prob_diff=1.0)
    assert backend.label == "openvino-int8"
    check = backend.verification
    assert check["real_images"] == {"spec": labelled, "images": 8} and 0.0 <= check["max_abs_diff"] <= 1.0
    probs = backend.predict(batch_of(2))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_openvino_refuses_a_gpu_device(artifact):
    with pytest.raises(BackendUnavailableError, match="runs on the CPU"):
        load_backend(artifact, "openvino", device="cuda")


def test_bench_reports_openvino_with_its_ratio_to_onnxruntime(artifact, labelled):
    from pathlib import Path

    report = bench.run_benchmark(Path(artifact), batch_sizes=[2], seconds=0.05, warmup_s=0, num_threads=1,
                                 only=["onnxruntime-cpu-fp32", "openvino-cpu-fp32"], verify_labels=labelled)
    rows = {row["backend"]: row for row in report["results"]}
    assert set(rows) == {bench.BASELINE, "onnxruntime-cpu-fp32", "openvino-cpu-fp32"}
    ov, ort = rows["openvino-cpu-fp32"], rows["onnxruntime-cpu-fp32"]
    assert ov["fp32_equivalent"] and ov["max_abs_diff_vs_baseline"] <= 1e-4
    assert ort["ratio_vs_onnxruntime"] == 1.0 and ov["ratio_vs_onnxruntime"] > 0
    assert abs(ov["ratio_vs_onnxruntime"] - ov["images_per_s"] / ort["images_per_s"]) <= 0.01
    assert ov["ms_per_image"] == pytest.approx(1000 / ov["images_per_s"], rel=0.01)
    assert report["machine"]["openvino"] and isinstance(report["machine"]["cpu_flags"], list)
    # on the labelled set's real images, against ONNX Runtime fp32: fp32 OpenVINO is the same model
    accuracy = report["accuracy_vs_onnxruntime"]
    assert accuracy["reference"] == "onnxruntime-cpu-fp32" and accuracy["images"] + accuracy["skipped"] == 24
    assert set(accuracy["engines"]) == {bench.BASELINE, "openvino-cpu-fp32"}
    ov_real = accuracy["engines"]["openvino-cpu-fp32"]
    assert ov_real["max_abs_diff"] <= 1e-4 and ov_real["within_limits"] is True
    assert abs(ov_real["auc_change"]) <= 1e-3 and ov_real["auc"] == pytest.approx(accuracy["reference_auc"], abs=1e-3)


def test_preflight_refuses_cpu_int8_without_calibration_images():
    for backend in ("auto", "openvino"):
        with pytest.raises(UsageError, match="--precision int8 on the CPU .openvino, NNCF. is calibrated on real images"):
            check_engine(backend, "int8", gpus=0)
    check_engine("openvino", "int8", gpus=0, calibration="labels.csv")
