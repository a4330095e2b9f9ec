"""ONNX export: every registered architecture exports, and ONNX Runtime agrees with PyTorch."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from cxr_ray import testing
from cxr_ray.engines.contract import INPUT_NAME, OUTPUT_NAME
from cxr_ray.engines.onnxruntime.build import (
    ExportVerificationError,
    FixedAdaptiveAvgPool2d,
    ensure_onnx,
    export_model,
    export_onnx,
    verify_onnx,
)
from cxr_ray.errors import ArtifactError, UsageError
from cxr_ray.models.artifact import ONNX_FILE, load_card, sha256_file
from cxr_ray.models.build import build_model
from cxr_ray.models.registry import get_arch, list_archs
from cxr_ray.testing import CLASSES

# Small models on a shared 2-core box: more threads only add contention.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_artifact(directory, arch: str, size: int | None = None, seed: int = 0):
    return testing.make_artifact(directory, arch=arch, image_size=size or max(64, get_arch(arch).min_image_size),
                                 name=f"test-{arch}", seed=seed)


@pytest.mark.parametrize("arch", list_archs())
def test_every_registered_arch_exports_and_matches_pytorch(tmp_path, arch):
    root = make_artifact(tmp_path / arch, arch)
    size = max(64, get_arch(arch).min_image_size)

    result = export_onnx(root)

    assert result["max_abs_diff"] <= 1e-4
    assert result["opset"] == 17 and result["input"] == INPUT_NAME and result["output"] == OUTPUT_NAME
    assert result["sha256"] == sha256_file(root / ONNX_FILE)
    card = load_card(str(root))
    assert card.onnx["sha256"] == result["sha256"]
    assert card.onnx["model_version"] == card.version
    assert set(card.onnx) >= {"file", "sha256", "opset", "max_abs_diff", "exported_at"}

    # verify_onnx checked the declared input (dynamic batch, 1 x S x S) and ran batches of 1 and 3,
    # neither of which is the batch of 2 the graph was traced with.
    assert card.onnx["verified_batch_sizes"] == [1, 3]
    assert card.onnx["input_shape"] == ["batch", 1, size, size]
    assert card.onnx["output_shape"] == ["batch", len(CLASSES)]


@pytest.mark.parametrize(("in_size", "out_size"), [((2, 2), (7, 7)), ((5, 9), (3, 4)), ((7, 7), (7, 7)), ((1, 3), (2, 2))])
def test_fixed_adaptive_pool_equals_torch(in_size, out_size):
    x = torch.randn(2, 4, *in_size)
    expected = nn.AdaptiveAvgPool2d(out_size)(x)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d(in_size, out_size)(x), expected, atol=1e-6, rtol=1e-6)


def test_pool_rewrite_leaves_the_original_model_alone():
    from cxr_ray.engines.onnxruntime.build import make_exportable

    model = build_model("vgg19", 3).eval()
    exportable = make_exportable(model, 64)  # 2x2 feature map -> 7x7 pool: rewritten, in a copy
    assert type(model.avgpool) is nn.AdaptiveAvgPool2d
    assert isinstance(exportable.avgpool, FixedAdaptiveAvgPool2d) and exportable is not model
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exportable(x), model(x), atol=1e-5, rtol=1e-4)
    resnet = build_model("resnet50", 3).eval()
    assert make_exportable(resnet, 64) is resnet  # global pool (output 1x1): exported as is


def test_verification_catches_a_graph_of_another_model(tmp_path):
    torch.manual_seed(0)
    exported = build_model("mobilenet_v2", 3).eval()
    export_model(exported, 64, tmp_path / "a.onnx")
    assert verify_onnx(exported, tmp_path / "a.onnx", 64) <= 1e-5
    torch.manual_seed(1)
    other = build_model("mobilenet_v2", 3).eval()
    with torch.no_grad():  # make the two models' outputs clearly different
        other.classifier[1].weight.mul_(50)
    assert verify_onnx(other, tmp_path / "a.onnx", 64) > 1e-3


def test_export_above_tolerance_raises_and_writes_nothing(tmp_path):
    root = make_artifact(tmp_path / "m", "densenet121")
    # fp32 kernels of ONNX Runtime and PyTorch never agree to 1e-12 on a 121-layer network.
    with pytest.raises(ExportVerificationError, match="disagree"):
        export_onnx(root, atol=1e-12)
    assert not (root / ONNX_FILE).exists()
    assert load_card(str(root)).onnx is None
    assert not list(root.glob(".model.onnx.tmp*"))


def test_export_refuses_remote_and_non_artifacts(tmp_path):
    with pytest.raises(UsageError, match="local directory"):
        export_onnx("s3://bucket/model")
    with pytest.raises(ArtifactError, match="not a model artifact"):
        export_onnx(tmp_path)


def test_artifact_without_onnx_is_exported_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    root = make_artifact(tmp_path / "m", "mobilenet_v2")
    card = load_card(str(root))

    path, sha = ensure_onnx(root, card)
    assert path.is_relative_to(tmp_path / "cache") and sha == sha256_file(path)
    assert not (root / ONNX_FILE).exists() and load_card(str(root)).onnx is None  # artifact untouched
    mtime = path.stat().st_mtime_ns
    again, sha_again = ensure_onnx(root, card)
    assert (again, sha_again) == (path, sha) and again.stat().st_mtime_ns == mtime
    assert json.loads((path.parent / "onnx.json").read_text())["max_abs_diff"] <= 1e-4


def test_stale_or_unrecorded_onnx_is_refused(tmp_path):
    root = make_artifact(tmp_path / "m", "mobilenet_v2")
    (root / ONNX_FILE).write_bytes(b"an old export")
    card = load_card(str(root))
    card.onnx = {"file": ONNX_FILE, "sha256": sha256_file(root / ONNX_FILE), "model_version": "0000000000000000"}
    with pytest.raises(ArtifactError, match="re-run"):
        ensure_onnx(root, card)
    card.onnx = {"file": ONNX_FILE, "model_version": card.version}
    with pytest.raises(ArtifactError, match="without a sha256"):
        ensure_onnx(root, card)
    (root / ONNX_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        ensure_onnx(root, card)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")
def test_dynamo_exporter(tmp_path):
    root = make_artifact(tmp_path / "m", "resnet50")
    assert export_onnx(root, exporter="dynamo")["max_abs_diff"] <= 1e-4


def test_export_verb_names_each_step_on_stderr_and_keeps_stdout_json(tmp_path, capsys):
    from cxr_ray.cli import main

    root = make_artifact(tmp_path / "m", "resnet18")
    assert main(["export", "--model", str(root), "--format", "onnx"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["format"] == "onnx"  # stdout: the record only
    steps = [line.split(":", 1)[1].split("...")[0].strip() for line in err.splitlines() if line.startswith("export onnx:")]
    assert steps[0].startswith("loading ") and steps[1].startswith("tracing resnet18 to ONNX (opset 17")
    assert steps[2].startswith("verifying with ONNX Runtime") and steps[3].startswith("done in ")
