"""Fail fast in the driver: impossible engine / precision / device requests, broken artifacts and
unwritable outputs are one clear error before any Ray task or actor starts."""

from __future__ import annotations

import json

import pytest

from cxr_ray import testing
from cxr_ray.engines import preflight
from cxr_ray.engines.preflight import check_engine
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16
from cxr_ray.errors import ArtifactError, BackendUnavailableError, UsageError
from cxr_ray.io.storage import check_writable
from cxr_ray.models.artifact import CARD_FILE, WEIGHTS_FILE, verify_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return str(testing.make_artifact(tmp_path_factory.mktemp("preflight") / "model"))


@pytest.fixture()
def no_bf16(monkeypatch):
    """A CPU without AVX512-BF16 / AMX, as the machines here are (the probe itself is tested below)."""
    monkeypatch.setitem(preflight.NATIVE_ONLY_ON_CPU, "bf16", (lambda: False, "AVX512-BF16 or AMX"))


def test_bf16_on_a_cpu_without_bf16_instructions_is_refused(no_bf16):
    for backend in ("auto", "torch"):
        with pytest.raises(BackendUnavailableError, match=r"--precision bf16: this CPU has no AVX512-BF16 or AMX"):
            check_engine(backend, "bf16", gpus=0)
    check_engine("torch", "bf16", gpus=0, local=False)  # a remote cluster's CPUs are not this one's


def test_bf16_follows_this_cpus_real_instructions():
    if cpu_has_native_bf16():
        check_engine("torch", "bf16", gpus=0)
    else:
        with pytest.raises(BackendUnavailableError):
            check_engine("torch", "bf16", gpus=0)


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime-trt"], ids=["trt-plans", "ort-trt-provider"])
def test_gpu_only_engines_without_a_gpu_are_refused(backend):
    with pytest.raises(BackendUnavailableError, match=f"--backend {backend} needs an NVIDIA GPU"):
        check_engine(backend, "auto", gpus=0)


def test_cuda_device_without_a_gpu_is_refused():
    with pytest.raises(BackendUnavailableError, match="--device cuda:0: no CUDA GPU"):
        check_engine("torch", "fp32", gpus=0, device="cuda:0")


def test_precisions_an_engine_does_not_run_are_refused_naming_the_option():
    with pytest.raises(UsageError, match=r"--precision fp16: fp16 on the CPU is slower"):
        check_engine("torch", "fp16", gpus=0)
    with pytest.raises(UsageError, match=r"--precision bf16: onnxruntime runs fp32 only"):
        check_engine("onnxruntime", "bf16", gpus=0)
    with pytest.raises(UsageError, match="unknown backend 'onnxrt'"):
        check_engine("onnxrt", "fp32", gpus=0)


def test_what_runs_passes():
    for backend in ("auto", "onnxruntime", "torch"):
        check_engine(backend, "fp32", gpus=0)
    check_engine("auto", "auto", gpus=0)


def test_an_unwritable_output_is_refused_and_a_writable_one_left_clean(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"--output .*a-file/run: cannot write there"):
        check_writable(str(blocker / "run"))
    new = tmp_path / "out" / "run"
    check_writable(str(new))
    assert not (tmp_path / "out").exists()  # the probe and the folders it made are gone
    existing = tmp_path / "existing"
    existing.mkdir()
    check_writable(str(existing))
    assert existing.is_dir() and list(existing.iterdir()) == []  # a folder that was there stays, empty


def test_a_broken_artifact_is_refused(artifact, tmp_path):
    assert verify_artifact(artifact).name
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(artifact, edited)
    card = json.loads((edited / CARD_FILE).read_text())
    card["classes"] = list(reversed(card["classes"]))  # the weights' rows now mean other classes
    (edited / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="changed since version"):
        verify_artifact(str(edited))
    (edited / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        verify_artifact(str(edited))
    with pytest.raises(ArtifactError, match="not a model artifact"):
        verify_artifact(str(tmp_path / "nothing-here"))


def test_screen_refuses_bf16_before_any_task_or_actor(ray_cluster, artifact, no_bf16, tmp_path):
    from cxr_ray.screen.config import ScreenConfig
    from cxr_ray.screen.job import run_screen

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    config = ScreenConfig(model=artifact, inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"),
                          backend="torch", precision="bf16", actors=(1, 1), progress_every_s=0)
    with pytest.raises(BackendUnavailableError, match="--precision bf16"):
        run_screen(config)
    assert not (tmp_path / "out" / "parts").exists() and not (tmp_path / "out" / "_runs").exists()


def test_bench_screen_with_bf16_stops_with_one_error_line(no_bf16, tmp_path, capsys):
    from cxr_ray.cli import main

    assert main(["bench", "screen", "--arch", "mobilenet_v2", "--input", str(tmp_path), "--precision", "bf16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision bf16" in err[0]
