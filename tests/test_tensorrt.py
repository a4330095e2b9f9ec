"""TensorRT export and backend.

Tests marked ``tensorrt`` need the ``tensorrt`` package and a CUDA GPU; the
conftest skips them, with the reason, elsewhere. The unmarked tests cover what
runs without them: the install hint, and the INT8 calibration sample (decode +
preprocess of a manifest), which is plain CPU code.
"""

from __future__ import annotations

import argparse
import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_ray.errors import ArtifactError, BackendUnavailableError
from cxr_ray.models.artifact import ENGINES_DIR, load_card, load_model
from cxr_ray.testing import CLASSES, make_artifact

SIZE = 64
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def artifact(tmp_path):
    return make_artifact(tmp_path / "artifact", name="trt-test", image_size=SIZE)


def write_png(path, seed: int, *, bits: int = 8, size=(80, 96)) -> None:
    rng = np.random.default_rng(seed)
    if bits == 8:
        image = Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))
    else:
        image = Image.fromarray(rng.integers(0, 65536, size, dtype=np.uint16))  # mode I;16
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


@pytest.fixture()
def calibration_manifest(tmp_path):
    images = tmp_path / "calib"
    images.mkdir()
    names = []
    for i in range(5):
        write_png(images / f"img{i}.png", seed=i, bits=8 if i % 2 else 16)
        names.append(f"calib/img{i}.png")
    (images / "notes.png").write_text("not an image at all")
    names.append("calib/notes.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "\n".join(names) + "\n")
    return manifest


# --------------------------------------------------------------------------- no TensorRT needed


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_says_how_to_install(artifact):
    from cxr_ray.engines.tensorrt.build import export_tensorrt
    from cxr_ray.engines.tensorrt.runtime import import_tensorrt, tensorrt_available

    with pytest.raises(BackendUnavailableError, match=r"extra-index-url https://pypi\.nvidia\.com"):
        import_tensorrt()
    with pytest.raises(BackendUnavailableError, match="nvcr.io/nvidia"):
        export_tensorrt(artifact)
    assert tensorrt_available() is False


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_export_command_tensorrt_without_tensorrt(artifact):
    from cxr_ray.commands import export

    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "--model", str(artifact), "--format", "tensorrt", "--precision", "fp16"])
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        export.run(args)


def test_calibration_sample_is_the_models_preprocessing(calibration_manifest, artifact):
    from cxr_ray.engines.tensorrt.calibration import load_calibration_images
    from cxr_ray.io.decode import decode_image
    from cxr_ray.preprocess import preprocess

    card = load_card(str(artifact))
    images, info = load_calibration_images(str(calibration_manifest), card, limit=10)
    assert info == {"images": 5, "skipped": 1, "candidates": 6, "seed": 0}
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.float32
    first = calibration_manifest.parent / "calib" / "img0.png"
    expected = preprocess(decode_image(first.read_bytes(), "img0.png", target_size=SIZE).pixels, card.preprocess_config)
    np.testing.assert_allclose(images[0], expected, atol=1e-6)

    sample, info = load_calibration_images(str(calibration_manifest), card, limit=3, seed=1)
    assert info["images"] + info["skipped"] == 3 and info["candidates"] == 6
    assert len(sample) == info["images"]
    again, _ = load_calibration_images(str(calibration_manifest), card, limit=3, seed=1)
    np.testing.assert_array_equal(sample, again)  # seeded: the same sample every build


# --------------------------------------------------------------------------- TensorRT + GPU


def _reference(artifact, batch: np.ndarray) -> np.ndarray:
    model, _ = load_model(str(artifact))
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()


@pytest.mark.tensorrt
def test_fp16_engine_is_built_once_verified_and_served(artifact):
    from cxr_ray.engines.load import load_backend
    from cxr_ray.engines.tensorrt.build import export_tensorrt

    result = export_tensorrt(artifact, precision="fp16", max_batch=8)
    assert result["built"] and result["max_abs_diff"] <= 2e-2
    assert result["file"].startswith(f"{ENGINES_DIR}/sm") and "-fp16-b1-8-8-64" in result["key"]
    card = load_card(str(artifact))
    assert card.onnx is not None  # exported on the way
    assert [e["key"] for e in card.engines] == [result["key"]]
    assert export_tensorrt(artifact, precision="fp16", max_batch=8)["built"] is False

    backend = load_backend(str(artifact), "tensorrt", max_batch=8)
    assert load_backend(str(artifact), "auto", max_batch=8).name == "tensorrt"
    for n in (1, 5, 13):  # 13 > max_batch: run in chunks
        batch = np.random.default_rng(n).standard_normal((n, 1, SIZE, SIZE), dtype=np.float32)
        got = backend.predict(batch)
        assert got.shape == (n, len(CLASSES)) and got.dtype == np.float32
        np.testing.assert_allclose(got, _reference(artifact, batch), atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="expected a batch of shape"):
        backend.predict(np.zeros((2, 1, SIZE + 1, SIZE), np.float32))


@pytest.mark.tensorrt
def test_fp32_engine_is_close_to_pytorch(artifact):
    from cxr_ray.engines.tensorrt.build import export_tensorrt

    result = export_tensorrt(artifact, precision="fp32", max_batch=4, opt_batch=2)
    assert result["max_abs_diff"] <= 1e-3 and "-fp32-b1-2-4-" in result["key"]


@pytest.mark.tensorrt
def test_tampered_engine_is_refused(artifact):
    from cxr_ray.engines.load import load_backend
    from cxr_ray.engines.tensorrt.build import export_tensorrt

    result = export_tensorrt(artifact, precision="fp16", max_batch=4)
    path = artifact / result["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the recorded"):
        load_backend(str(artifact), "tensorrt", max_batch=4)


@pytest.mark.tensorrt
def test_int8_engine_calibrated_from_a_manifest(artifact, calibration_manifest):
    from cxr_ray.engines.tensorrt.build import export_tensorrt

    result = export_tensorrt(artifact, precision="int8", max_batch=4, calibration=str(calibration_manifest),
                             atol=0.5)
    assert result["calibration"]["images"] == 5 and "-int8-" in result["key"]
    assert (artifact / ENGINES_DIR / f"{result['key']}.calib").is_file()


@pytest.mark.tensorrt
def test_engine_key_names_this_gpu_and_tensorrt():
    import tensorrt as trt

    from cxr_ray.engines.tensorrt.build import current_engine_key

    major, minor = torch.cuda.get_device_capability(0)
    key = current_engine_key(device=0, precision="fp16", min_batch=1, opt_batch=4, max_batch=4, image_size=SIZE)
    assert key == f"sm{major}{minor}-trt{trt.__version__}-fp16-b1-4-4-{SIZE}"
