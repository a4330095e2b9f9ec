"""Grad-CAM / LRP heatmaps: shapes at the original image size, every registered architecture,
unsupported pairs, the caller's model left alone, repeatability, real X-rays, overlays,
the localisation metrics and ``cxr-ray explain`` end to end.

Models here are untrained (random weights, BN statistics from one pass over noise):
these tests check the machinery; ``test_explain_localisation.py`` checks that the
heatmaps of a trained model land on the lesions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxr_ray.cli import main as cli_main
from cxr_ray.explain import (
    Explainer,
    UnsupportedExplanationError,
    energy_ratio,
    explain,
    heatmap_grid,
    overlay_png_bytes,
    pointing_hit,
    save_overlay,
    supported_pairs,
)
from cxr_ray.explain.localisation import summarise
from cxr_ray.explain.methods import default_layer
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card
from cxr_ray.models.registry import get_arch, list_archs
from cxr_ray.testing import CLASSES

LRP_ARCHS = [arch for arch in list_archs() if get_arch(arch).supports_lrp]  # the registry says which


def _model(arch: str, size: int, seed: int = 0) -> tuple[nn.Module, object]:
    """A random-weight model whose batch norms have seen data (so activations are not degenerate)."""
    torch.manual_seed(seed)
    model = build_model(arch, len(CLASSES))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, size, size))
    card = new_card(name=f"test-{arch}", arch=arch, classes=CLASSES, image_size=size, positive_class="covid")
    return model.eval(), card


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def densenet():
    return _model("densenet121", 64)


def _image(height: int = 90, width: int = 70, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((yy - height * 0.6) / 8.0) ** 2 + ((xx - width * 0.3) / 6.0) ** 2))
    return np.clip(0.3 + 0.5 * blob + 0.05 * rng.standard_normal((height, width)), 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("arch", list_archs())
def test_gradcam_every_registered_architecture(arch):
    size = max(64, get_arch(arch).min_image_size)
    model, card = _model(arch, size)
    pixels = _image(97, 61)  # not square, not the model size: the heatmap must come back at 97 x 61
    result = explain(model, card, pixels, method="gradcam", target="covid")
    assert result.heatmap.shape == (97, 61) and result.heatmap.dtype == np.float32
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    assert result.method == "gradcam" and result.target_class == "covid" and result.target_index == 0
    assert result.score == pytest.approx(result.probabilities["covid"])
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", LRP_ARCHS)
def test_lrp_copy_is_the_same_function_and_gives_a_map(arch):
    model, card = _model(arch, 64)
    x = torch.randn(2, 1, 64, 64)
    explainer = Explainer(model, card, "lrp")
    with torch.no_grad():
        torch.testing.assert_close(explainer.net(x), model(x), rtol=1e-4, atol=1e-4)
    result = explainer.explain(_image(), target=1)
    assert result.heatmap.shape == (90, 70) and result.target_class == "normal"
    assert result.heatmap.max() == pytest.approx(1.0)  # some positive relevance, scaled to 1


def test_unsupported_pairs_raise_a_typed_error_listing_the_supported_ones():
    model, card = _model("mobilenet_v2", 64)
    with pytest.raises(UnsupportedExplanationError) as info:
        explain(model, card, _image(), method="lrp")
    message = str(info.value)
    assert "mobilenet_v2" in message and "ReLU6" in message
    assert "densenet121/lrp" in message and "vgg19/lrp" in message and "mobilenet_v2/gradcam" in message
    with pytest.raises(UnsupportedExplanationError, match="unknown explanation method 'shap'"):
        Explainer(model, card, "shap")
    pairs = supported_pairs()
    assert {(a, "gradcam") for a in list_archs()} <= set(pairs)
    assert {("vgg19", "lrp"), ("densenet121", "lrp")} <= set(pairs)
    assert ("inception_v3", "lrp") not in pairs


def test_targets_by_name_index_and_prediction(densenet):
    model, card = densenet
    pixels = _image()
    by_name = explain(model, card, pixels, target="pneumonia")
    by_index = explain(model, card, pixels, target=2)
    np.testing.assert_array_equal(by_name.heatmap, by_index.heatmap)
    predicted = explain(model, card, pixels)
    assert predicted.target_class == max(predicted.probabilities, key=predicted.probabilities.get)
    with pytest.raises(ValueError, match="unknown class 'tb'; valid: covid, normal, pneumonia"):
        explain(model, card, pixels, target="tb")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, card, pixels, target=3)
    with pytest.raises(ValueError, match="2-D"):
        explain(model, card, np.zeros((2, 8, 8), np.float32))


def test_layer_defaults_come_from_the_registry_and_can_be_overridden(densenet):
    model, card = densenet
    spec = get_arch("densenet121")
    assert explain(model, card, _image()).layer == spec.gradcam_layer
    assert explain(model, card, _image(), method="lrp").layer == "features.transition2.pool"
    pixel_level = explain(model, card, _image(), method="lrp", layer=spec.first_conv)
    assert pixel_level.layer == "features.conv0" and pixel_level.heatmap.shape == (90, 70)
    assert default_layer("vgg19", "lrp") == "features.18"  # block-3 pool, see methods.py
    assert default_layer("resnet18", "lrp") == get_arch("resnet18").first_conv
    assert default_layer("vgg19", "gradcam") == "features.35"  # the last conv's ReLU, not the conv
    assert default_layer("resnet50", "gradcam") == get_arch("resnet50").gradcam_layer
    fine = explain(model, card, _image(), layer="features.denseblock3")
    assert fine.layer == "features.denseblock3" and fine.heatmap.shape == (90, 70)
    with pytest.raises(ValueError, match="no layer 'features.nope'"):
        Explainer(model, card, "gradcam", layer="features.nope")


def test_lrp_at_a_container_layer_names_the_layers_it_can_read_instead():
    model, card = _model("resnet18", 64)
    with pytest.raises(ValueError, match=r"'layer3' is a Sequential of several.*its last: layer3\.1\.add"):
        Explainer(model, card, "lrp", layer="layer3")
    stage = explain(model, card, _image(), method="lrp", layer="layer3.1.add")  # the stage's residual sum
    assert stage.layer == "layer3.1.add" and stage.heatmap.shape == (90, 70)


@pytest.mark.parametrize("method", ["gradcam", "lrp"])
def test_callers_model_is_left_untouched(densenet, method):
    model, card = densenet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inplace = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    explain(model, card, _image(), method=method)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == inplace and any(inplace)
    assert not model.training
    assert all(not hasattr(m, "rule") for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam", "lrp"])
def test_heatmaps_are_repeatable_to_the_byte(densenet, method):
    model, card = densenet
    pixels = _image(seed=3)
    explainer = Explainer(model, card, method)
    first = explainer.explain(pixels, "covid").heatmap
    second = explainer.explain(pixels, "covid").heatmap
    fresh = explain(model, card, pixels, method=method, target="covid").heatmap
    assert first.tobytes() == second.tobytes() == fresh.tobytes()
    png = overlay_png_bytes(pixels, explain(model, card, pixels, method=method, target="covid").heatmap)
    assert png == overlay_png_bytes(pixels, explainer.explain(pixels, "covid").heatmap)


def test_explains_under_inference_mode(densenet):
    """Serving code runs under inference_mode; attribution must still get its gradients."""
    model, card = densenet
    expected = explain(model, card, _image(), target="covid").heatmap
    with torch.inference_mode():
        inside = explain(model, card, _image(), target="covid").heatmap
    np.testing.assert_array_equal(inside, expected)


def test_real_xrays_get_heatmaps_at_their_own_size(real_data_dir: Path, densenet):
    model, card = densenet
    files = [p for p in sorted(real_data_dir.iterdir()) if p.is_file()]
    formats = set()
    for method in ("gradcam", "lrp"):
        explainer = Explainer(model, card, method)
        for path in files:
            decoded = decode_image(path.read_bytes(), path.name)
            formats.add(decoded.meta.format)
            result = explainer.explain(decoded.pixels)
            assert result.heatmap.shape == decoded.pixels.shape == (decoded.meta.rows, decoded.meta.cols)
            assert np.isfinite(result.heatmap).all()
            assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    assert formats == {"png", "jpeg", "dicom"}
    png = Image.open(io.BytesIO(overlay_png_bytes(decoded.pixels, result.heatmap)))
    assert png.size == (decoded.meta.cols, decoded.meta.rows) and png.mode == "RGB"


# --------------------------------------------------------------------------- overlays


def test_overlay_png_at_original_size(tmp_path):
    pixels = _image(50, 40)
    heat = np.zeros_like(pixels)
    heat[10:20, 5:15] = 1.0
    data = overlay_png_bytes(pixels, heat)
    image = Image.open(io.BytesIO(data))
    assert image.size == (40, 50) and image.mode == "RGB"
    rgb = np.asarray(image).astype(int)
    grey = np.round(pixels * 255).astype(int)
    assert np.array_equal(rgb[30:, 20:, 0], grey[30:, 20:])  # no heat: the film, untouched
    assert np.abs(rgb[12, 8] - grey[12, 8]).max() > 20  # hot: coloured
    path = save_overlay(pixels, heat, tmp_path / "sub" / "o.png")
    assert Path(path).read_bytes() == data
    with pytest.raises(ValueError, match="same shape"):
        overlay_png_bytes(pixels, heat[:-1])


def test_heatmap_grid_one_png_rows_per_class(tmp_path, densenet):
    model, card = densenet
    samples = [(_image(seed=i), CLASSES[i % 3]) for i in range(7)] + [(_image(seed=9), 0)]
    summary = heatmap_grid(model, card, samples, tmp_path / "grid.png", per_class=2)
    assert summary["per_class"] == {"covid": 2, "normal": 2, "pneumonia": 2}
    assert len(summary["cells"]) == 6
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 300
    with pytest.raises(ValueError, match="not one of"):
        heatmap_grid(model, card, [(_image(), "tb")], tmp_path / "bad.png")


# --------------------------------------------------------------------------- metrics


def test_energy_ratio_and_pointing_game_on_known_maps():
    mask = np.zeros((100, 100), bool)
    mask[20:40, 60:80] = True  # 4 % of the image
    assert energy_ratio(np.ones((100, 100)), mask) == pytest.approx(1.0)  # uniform = chance
    assert energy_ratio(mask.astype(float), mask) == pytest.approx(25.0)  # all inside = 1 / 0.04
    assert energy_ratio(np.zeros((100, 100)), mask) == 0.0
    assert energy_ratio(~mask * 1.0, mask) == 0.0
    peak = np.zeros((100, 100))
    peak[30, 70] = 1.0
    assert pointing_hit(peak, mask)
    near = np.zeros((100, 100))
    near[30, 82] = 1.0  # 3 px right of the mask
    assert not pointing_hit(near, mask)
    assert pointing_hit(near, mask, tolerance=0.03)  # 3 px tolerance at 100 px
    assert not pointing_hit(np.zeros((100, 100)), mask)  # no evidence points nowhere
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((50, 50), Image.NEAREST))
    assert energy_ratio(mask.astype(float), small_mask) == pytest.approx(25.0)  # mask resized to the map
    summary = summarise([(peak, mask), (near, mask)], tolerance=0.03)
    assert summary["n"] == 2 and summary["pointing_game"] == 0.5 and summary["pointing_game_tolerant"] == 1.0
    assert summary["chance_pointing"] == pytest.approx(0.04)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, densenet):
    model, card = densenet
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    save_artifact(out, model, card)
    return out


def test_cli_explain_end_to_end(tmp_path, tiny_artifact, real_data_dir, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((_image(80, 60) * 255).astype(np.uint8)).save(inputs / "a.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (inputs / "notes.txt").write_text("not an x-ray")
    dicom = real_data_dir / "rsna-pneumonia-sample.dcm"
    out = tmp_path / "out"
    code = cli_main(
        ["explain", "--model", str(tiny_artifact), str(inputs), str(dicom), str(tmp_path / "missing.png"),
         "--method", "lrp", "--class", "pneumonia", "--out", str(out)]
    )
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    assert set(by_name) == {"a.png", "broken.png", "notes.txt", "rsna-pneumonia-sample.dcm", "missing.png"}
    assert by_name["broken.png"]["status"] == "error" and by_name["broken.png"]["error_code"] == "truncated"
    assert by_name["notes.txt"]["error_code"] == "not_an_image"
    assert by_name["missing.png"]["error_code"] == "read_failed"
    for name, shape in (("a.png", (80, 60)), ("rsna-pneumonia-sample.dcm", (1024, 1024))):
        record = by_name[name]
        assert record["status"] == "ok" and record["method"] == "lrp" and record["class"] == "pneumonia"
        assert 0.0 <= record["score"] <= 1.0
        with Image.open(record["files"]["overlay"]) as image:
            image.load()
            assert image.format == "PNG" and image.size == (shape[1], shape[0])
        heat = np.load(record["files"]["heatmap"])
        assert heat.shape == shape and heat.dtype == np.float32
    assert sorted(p.name for p in out.iterdir()) == [
        "a.lrp.npy", "a.lrp.png", "rsna-pneumonia-sample.lrp.npy", "rsna-pneumonia-sample.lrp.png"
    ]


def test_cli_explain_usage_errors(tmp_path, tiny_artifact, capsys):
    image = tmp_path / "a.png"
    Image.fromarray((_image() * 255).astype(np.uint8)).save(image)
    base = ["explain", "--model", str(tiny_artifact), str(image), "--out", str(tmp_path / "o")]
    assert cli_main([*base, "--class", "tb"]) == 2
    assert "not one of the model's classes" in json.loads(capsys.readouterr().err)["message"]
    assert cli_main(["explain", "--model", str(tiny_artifact), str(image)]) == 2
    assert "--out" in json.loads(capsys.readouterr().err)["message"]
