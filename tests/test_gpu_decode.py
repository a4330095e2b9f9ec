"""The GPU decode path without a GPU: its value math equals the numpy path, its routes and fallbacks.

:class:`~cxr_ray.io.gpu.decode.GpuDecoder` runs here with the Pillow reference codec on CPU
tensors: the same guards, routes, batching, LUT / VOI / MONOCHROME1 torch ops and fallbacks that
run on a GPU with nvImageCodec. What nvImageCodec itself returns is checked by the ``gpu`` test
at the end (skipped, with the reason, where torch sees no GPU) and by ``cxr-ray bench gpu``.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.sequence import Sequence
from pydicom.uid import HTJ2KLossless, JPEG2000Lossless, RLELossless
from test_decode_dicom import make_dataset, make_dicom, ramp, to_bytes

from cxr_ray.errors import BackendUnavailableError, DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.gpu.codec import PillowCodec, import_nvimgcodec, nvimgcodec_available
from cxr_ray.io.gpu.decode import CPU_NOTE, DeviceImage, GpuDecoder
from cxr_ray.io.gpu.values import VALUES_ATOL
from cxr_ray.io.inputs import InputPolicy
from cxr_ray.io.types import DecodedImage, DecodePolicy


def gpu_path(data: bytes, target_size: int | None = None, policy: DecodePolicy | None = None):
    decoder = GpuDecoder(InputPolicy(decode=policy or DecodePolicy(), target_size=target_size),
                         codec=PillowCodec("cpu"))
    return decoder.decode(["input.dcm"], data=[data], names=["input.dcm"])[0]


def assert_same_as_cpu(data: bytes, target_size: int | None = None, atol: float = VALUES_ATOL) -> DeviceImage:
    expected = decode_image(data, "input.dcm", target_size=target_size)
    got = gpu_path(data, target_size)
    assert isinstance(got, DeviceImage), got
    assert got.pixels.dtype == torch.float32 and tuple(got.pixels.shape) == expected.pixels.shape
    assert float(np.abs(got.pixels.numpy() - expected.pixels).max()) <= atol
    assert got.meta == expected.meta  # warnings (invalid window, constant image) included
    return got


def lut_item(first: int, values: np.ndarray, bits: int = 16) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(values), first, bits]
    item.add_new("LUTData", "US", [int(v) for v in values])
    return item


SYNTHETIC = {
    "monochrome2 12-bit min-max": dict(bits_stored=12),
    "monochrome1": dict(bits_stored=12, photometric="MONOCHROME1"),
    "rescale + linear window": dict(bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                                    WindowCenter=1500, WindowWidth=2000),
    "linear exact": dict(bits_stored=12, WindowCenter=1000, WindowWidth=900, VOILUTFunction="LINEAR_EXACT"),
    "sigmoid, monochrome1": dict(bits_stored=12, WindowCenter=1800, WindowWidth=1200, VOILUTFunction="SIGMOID",
                                 photometric="MONOCHROME1"),
    "window width 1": dict(bits_stored=12, WindowCenter=2000, WindowWidth=1),
    "invalid window": dict(bits_stored=12, WindowCenter=2000, WindowWidth=0),
    "fractional rescale": dict(bits_stored=12, RescaleSlope="0.37", RescaleIntercept="12.5"),
}


@pytest.mark.parametrize("target_size", [None, 20])
@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_value_steps_equal_the_numpy_path(case, target_size):
    # 48 x 64 reduced towards 20: factor 2 (and 3 would leave a partial box on neither side)
    assert_same_as_cpu(make_dicom(ramp(), **SYNTHETIC[case]), target_size)


def test_box_reduction_with_partial_edge_boxes_matches_pillow():
    pixels = ramp(rows=50, cols=71)  # 50 // 16 = 3: boxes of 3, a partial one at each edge
    assert_same_as_cpu(make_dicom(pixels, bits_stored=12), target_size=16)


def test_voi_lut_sequence_and_modality_lut_sequence():
    pixels = (ramp(bits=10) // 4).astype(np.uint16)  # 0..255
    curve = np.round(4095 * (np.arange(256) / 255.0) ** 0.5)
    ds = make_dataset(pixels, bits_stored=8)
    ds.VOILUTSequence = Sequence([lut_item(0, curve)])
    assert_same_as_cpu(to_bytes(ds), target_size=None)
    assert_same_as_cpu(to_bytes(ds), target_size=20)
    both = make_dataset(pixels, bits_stored=8, photometric="MONOCHROME1")
    both.ModalityLUTSequence = Sequence([lut_item(10, np.arange(0, 3000, 12))])
    both.VOILUTSequence = Sequence([lut_item(0, curve[::-1])])
    assert_same_as_cpu(to_bytes(both))


def test_modality_lut_then_window():
    pixels = (ramp(bits=10) // 4).astype(np.uint16)
    ds = make_dataset(pixels, bits_stored=8, WindowCenter=900, WindowWidth=600)
    ds.ModalityLUTSequence = Sequence([lut_item(5, np.arange(0, 2000, 8))])
    assert_same_as_cpu(to_bytes(ds), target_size=20)


def test_bits_stored_respected_for_unsigned_and_signed_native_frames():
    stored = ramp(bits=12)
    garbage = (stored | 0xF000).astype(np.uint16)  # bits above BitsStored must be ignored
    assert_same_as_cpu(make_dicom(garbage, bits_stored=12))
    signed = np.linspace(-2048, 2047, 48 * 64).reshape(48, 64).astype(np.int16)
    raw = ((signed.astype(np.int32) & 0x0FFF) | 0x7000).astype(np.uint16).view(np.int16)  # garbage high bits
    assert_same_as_cpu(make_dicom(raw, bits_stored=12, WindowCenter=0, WindowWidth=3000))


def test_constant_image_is_zero_with_the_same_note():
    got = assert_same_as_cpu(make_dicom(np.full((16, 16), 700, np.uint16), bits_stored=12))
    assert "image is constant" in got.meta.warnings and float(got.pixels.max()) == 0.0


def test_jpeg2000_frames_decode_like_the_cpu_path():
    ds = make_dataset(ramp(), bits_stored=12, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=2500)
    ds.compress(JPEG2000Lossless)
    assert_same_as_cpu(to_bytes(ds))  # full resolution: the same stored values, bit for bit


def test_real_jpeg_dicoms_and_files_equal_the_cpu_path_at_full_size(real_data_dir):
    for name in ("rsna-pneumonia-sample.dcm", "rsna-pneumonia-sample-monochrome1.dcm", "16747_3_1.jpg"):
        data = (real_data_dir / name).read_bytes()
        expected = decode_image(data, name)
        got = gpu_path(data)
        assert isinstance(got, DeviceImage), (name, got)
        assert float(np.abs(got.pixels.numpy() - expected.pixels).max()) <= VALUES_ATOL, name
        assert got.meta == expected.meta, name


def test_real_dicoms_at_model_size_stay_close_to_the_cpu_path(real_data_dir):
    # The CPU path decodes JPEG at 1/4 DCT scale; the GPU path decodes all of it and box-reduces.
    from cxr_ray.preprocess import resize_square

    for name in ("rsna-pneumonia-sample.dcm", "rsna-pneumonia-sample-monochrome1.dcm"):
        data = (real_data_dir / name).read_bytes()
        cpu = resize_square(decode_image(data, name, target_size=224).pixels, 224)
        got = gpu_path(data, target_size=224)
        gpu = resize_square(got.pixels.numpy(), 224)
        assert float(np.abs(gpu - cpu).mean()) < 0.01 and float(np.abs(gpu - cpu).max()) < 0.15, name


# ------------------------------------------------------------------ routes and fallbacks


def cpu_fallback(data: bytes, reason_part: str) -> DecodedImage:
    got = gpu_path(data)
    assert isinstance(got, DecodedImage), got
    expected = decode_image(data, "input.dcm")
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    notes = [w for w in got.meta.warnings if w.startswith(CPU_NOTE)]
    assert len(notes) == 1 and reason_part in notes[0], got.meta.warnings
    assert got.meta.warnings[:-1] == expected.meta.warnings
    return got


def test_inputs_without_a_gpu_codec_go_to_the_cpu_with_the_reason(real_data_dir):
    rle = make_dataset(ramp(), bits_stored=12)
    rle.compress(RLELossless)
    cpu_fallback(to_bytes(rle), "no GPU codec for RLE Lossless")
    colour = make_dicom(np.dstack([ramp(bits=8, dtype=np.uint8)] * 3), photometric="RGB")
    cpu_fallback(colour, "colour DICOM (RGB)")
    cpu_fallback((real_data_dir / "00000001_000.png").read_bytes(), "PNG files are decoded on the CPU")


def test_a_frame_the_codec_refuses_goes_to_the_cpu_with_the_reason():
    # A Part-1 codestream under the HTJ2K UID is valid HTJ2K (Part 15 reads Part 1); Pillow refuses HTJ2K.
    ds = make_dataset(ramp(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    cpu_fallback(to_bytes(ds), "pillow could not decode the htj2k frame")


def test_guards_refuse_before_any_codec_with_the_cpu_paths_codes():
    policy = DecodePolicy(max_pixels=1000)
    data = make_dicom(ramp(), bits_stored=12)
    cases = [
        (data[: len(data) - 100], DecodePolicy()),  # Pixel Data cut short
        (data, policy),  # 48 x 64 > 1000 pixels, from the header
        (b"GIF89a" + bytes(64), DecodePolicy()),
        (b"", DecodePolicy()),
    ]
    for raw, pol in cases:
        with pytest.raises(DecodeError) as expected:
            decode_image(raw, "input.dcm", policy=pol)
        got = gpu_path(raw, policy=pol)
        assert isinstance(got, DecodeError) and got.code == expected.value.code and got.message == expected.value.message


def test_one_bad_input_leaves_its_neighbours_alone(real_data_dir):
    good = (real_data_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    decoder = GpuDecoder(InputPolicy(target_size=64), codec=PillowCodec("cpu"))
    results = decoder.decode(["a.dcm", "b.dcm", "missing.dcm", "c.dcm"], data=[good, good[:5000], None, good])
    assert isinstance(results[0], DeviceImage) and isinstance(results[3], DeviceImage)
    assert isinstance(results[1], DecodeError) and results[1].code == "truncated"
    assert isinstance(results[2], DecodeError) and results[2].code == "read_failed"


# ------------------------------------------------------------------ without CUDA / nvImageCodec


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the refusal cannot happen here")
def test_gpu_decoder_refuses_cleanly_without_cuda():
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        GpuDecoder(InputPolicy())


@pytest.mark.skipif(nvimgcodec_available(), reason="nvImageCodec is installed here")
def test_missing_nvimgcodec_says_what_to_install():
    with pytest.raises(BackendUnavailableError, match="nvidia-nvimgcodec-cu13"):
        import_nvimgcodec()


@pytest.mark.gpu
def test_nvimgcodec_on_the_gpu_matches_the_cpu_path(real_data_dir):
    if not nvimgcodec_available():
        pytest.skip("nvImageCodec is not installed (pip install 'cxr-ray[gpu-decode]')")
    ds = make_dataset(ramp(), bits_stored=12, photometric="MONOCHROME1")
    ds.compress(JPEG2000Lossless)
    inputs = [to_bytes(ds), (real_data_dir / "rsna-pneumonia-sample.dcm").read_bytes(),
              (real_data_dir / "16747_3_1.jpg").read_bytes()]
    results = GpuDecoder(InputPolicy()).decode([f"in{i}" for i in range(3)], data=inputs)
    for data, got in zip(inputs, results, strict=True):
        assert isinstance(got, DeviceImage) and got.pixels.device.type == "cuda", got
        # nvJPEG's IDCT is not libjpeg's: lossy frames agree to a few 8-bit levels, lossless exactly
        expected = decode_image(data, "in")
        assert float(np.abs(got.pixels.cpu().numpy() - expected.pixels).max()) <= 4 / 255


def test_preprocess_tensor_is_the_cpu_preprocess(real_data_dir):
    from cxr_ray.preprocess import RESIZE_ATOL, PreprocessConfig, preprocess, preprocess_tensor

    config = PreprocessConfig(image_size=224)
    for shape in [(224, 224), (300, 217), (1024, 1024)]:
        pixels = np.random.default_rng(0).random(shape, dtype=np.float32)
        expected = preprocess(pixels, config)
        got = preprocess_tensor(torch.from_numpy(pixels), config).numpy()
        assert got.shape == expected.shape == (1, 224, 224)
        assert float(np.abs(got - expected).max()) <= RESIZE_ATOL / config.std


def test_nvidia_namespace_split_across_folders_is_joined(tmp_path):
    # One folder's nvidia/__init__.py (a CUDA wheel's) must not hide nvidia.* installed in another.
    import subprocess
    import sys

    (tmp_path / "a" / "nvidia").mkdir(parents=True)
    (tmp_path / "a" / "nvidia" / "__init__.py").write_text("")
    (tmp_path / "b" / "nvidia" / "elsewhere").mkdir(parents=True)
    (tmp_path / "b" / "nvidia" / "elsewhere" / "__init__.py").write_text("VALUE = 42\n")
    code = ("import importlib, importlib.util, sys; sys.path[:0] = sys.argv[1:3]; import nvidia\n"
            "assert importlib.util.find_spec('nvidia.elsewhere') is None\n"
            "from cxr_ray.io.gpu.mode import join_nvidia_namespace; join_nvidia_namespace()\n"
            "print(importlib.import_module('nvidia.elsewhere').VALUE)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr


def test_codec_outputs_become_grey_integer_frames():
    from PIL import Image

    from cxr_ray.io.gpu.codec import _grey_tensor

    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    luma = _grey_tensor(torch.from_numpy(rgb), to_grey=True)
    np.testing.assert_array_equal(luma.numpy(), np.asarray(Image.fromarray(rgb).convert("L")))  # Pillow's formula
    assert _grey_tensor(torch.from_numpy(rgb), to_grey=False) is None  # a colour DICOM frame: the CPU's
    stored = torch.from_numpy(np.arange(12, dtype=np.int32).reshape(3, 4, 1)).to(torch.uint16)
    frame = _grey_tensor(stored, to_grey=False)
    assert frame.dtype == torch.int32 and frame.shape == (3, 4) and int(frame[2, 3]) == 11
    assert _grey_tensor(torch.zeros(3, 4, 4, dtype=torch.uint8), to_grey=True) is None
