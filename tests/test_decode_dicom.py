"""DICOM decoding on DICOMs generated with pydicom: each branch of the pixel pipeline.

``make_dataset`` / ``to_bytes`` / ``make_dicom`` are imported by the other
decode tests (bad inputs, inspect, bench) to build their files.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxr_ray.errors import DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.pseudonym import pseudonymize
from cxr_ray.io.types import DecodePolicy
from cxr_ray.preprocess import resize_square

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_ID = "PAT-0042-SECRET"
PATIENT_NAME = "Doe^Jane"


def ramp(rows: int = 48, cols: int = 64, bits: int = 12, dtype=np.uint16) -> np.ndarray:
    """A deterministic image covering the whole stored range (exact min-max anchors)."""
    values = np.linspace(0, 2**bits - 1, rows * cols).reshape(rows, cols)
    values[::7, ::5] = 0  # some texture so lossless codecs have work to do
    return np.round(values).astype(dtype)


def make_dataset(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    sop_class: str | None = CR_IMAGE,
    modality: str | None = "CR",
    view: str | None = "PA",
    bits_stored: int | None = None,
    with_pixels: bool = True,
    **attributes,
) -> Dataset:
    """An uncompressed (Explicit VR Little Endian) dataset with identifiers to pseudonymise."""
    pixels = ramp() if pixels is None else pixels
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    instance = generate_uid()
    if sop_class is not None:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = generate_uid()
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = "19700101"
    if modality is not None:
        ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, *, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no DICM, no file meta (implicit VR little endian)
        bare = Dataset()
        bare.update(ds)
        pydicom.dcmwrite(
            buffer, bare, implicit_vr=True, little_endian=True, enforce_file_format=False
        )
    return buffer.getvalue()


def make_dicom(pixels: np.ndarray | None = None, **kwargs) -> bytes:
    return to_bytes(make_dataset(pixels, **kwargs))


def compressed(ds: Dataset, syntax) -> bytes:
    ds.compress(syntax)
    return to_bytes(ds)


def minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


# ------------------------------------------------------------------ grey pipeline


def test_monochrome2_is_min_max_scaled_float32():
    pixels = ramp()
    image = decode_image(make_dicom(pixels, bits_stored=12), "m2.dcm")
    assert image.pixels.dtype == np.float32 and image.pixels.shape == pixels.shape
    assert image.pixels.flags.c_contiguous and image.pixels.flags.writeable
    np.testing.assert_allclose(image.pixels, minmax(pixels), atol=1e-6)
    assert image.meta.format == "dicom"
    assert (image.meta.rows, image.meta.cols) == pixels.shape
    assert image.meta.bits_stored == 12 and image.meta.photometric_interpretation == "MONOCHROME2"


def test_monochrome1_is_the_inverse_of_its_monochrome2_twin():
    pixels = ramp()
    m2 = decode_image(make_dicom(pixels, bits_stored=12), "m2.dcm").pixels
    m1 = decode_image(
        make_dicom(pixels, bits_stored=12, photometric="MONOCHROME1"), "m1.dcm"
    ).pixels
    np.testing.assert_allclose(1.0 - m2, m1, atol=1e-6)


def test_monochrome1_inversion_comes_after_the_window():
    pixels = ramp()
    window = {"WindowCenter": 1000, "WindowWidth": 800}
    m2 = decode_image(make_dicom(pixels, bits_stored=12, **window), "m2.dcm").pixels
    m1 = decode_image(
        make_dicom(pixels, bits_stored=12, photometric="MONOCHROME1", **window), "m1"
    ).pixels
    np.testing.assert_allclose(1.0 - m2, m1, atol=1e-6)


def _pydicom_reference(ds: Dataset) -> np.ndarray:
    """pydicom's modality LUT + VOI (float64), mapped from its output range to [0, 1]."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    y_min, y_max = 0.0, 2.0**ds.BitsStored - 1
    if "RescaleSlope" in ds:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return (values - y_min) / (y_max - y_min)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_rescale_then_window_matches_pydicom(function):
    ds = make_dataset(
        ramp(),
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=1500,
        WindowWidth=2000,
        VOILUTFunction=function,
    )
    ours = decode_image(to_bytes(ds), "w.dcm").pixels
    reference = _pydicom_reference(pydicom.dcmread(io.BytesIO(to_bytes(ds))))
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    assert 0.0 < ours.mean() < 1.0
    if function != "SIGMOID":  # the sigmoid never reaches 0 or 1
        assert ours.min() == 0.0 and ours.max() == 1.0


def test_window_checked_numerically():
    # LINEAR, c=1000, w=501: 0 at x <= 749.5, 1 at x > 1249.5, linear in between.
    pixels = np.array([[0, 749, 750, 1000, 1249, 1250, 4095]], dtype=np.uint16)
    ours = decode_image(
        make_dicom(pixels, bits_stored=12, WindowCenter=1000, WindowWidth=501), "w"
    ).pixels
    expected = np.clip((pixels - 999.5) / 500 + 0.5, 0, 1)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_rescale_is_applied_before_the_window():
    # Stored 0..4095, slope 2 / intercept -1000 -> -1000..7190; window 0..1000 after rescale.
    pixels = np.array([[0, 500, 750, 1000, 4095]], dtype=np.uint16)
    ds = make_dataset(
        pixels,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=500.5,
        WindowWidth=1001,
    )
    ours = decode_image(to_bytes(ds), "r").pixels
    rescaled = pixels * 2.0 - 1000
    np.testing.assert_allclose(ours, np.clip(rescaled / 1000, 0, 1), atol=1e-6)


def test_first_of_several_windows_is_used():
    pixels = ramp()
    one = decode_image(
        make_dicom(pixels, bits_stored=12, WindowCenter=800, WindowWidth=600), "a"
    ).pixels
    several = decode_image(
        make_dicom(pixels, bits_stored=12, WindowCenter=[800, 2000], WindowWidth=[600, 100]), "b"
    ).pixels
    np.testing.assert_array_equal(one, several)


def test_invalid_window_falls_back_to_min_max_with_a_warning():
    pixels = ramp()
    image = decode_image(make_dicom(pixels, bits_stored=12, WindowCenter=100, WindowWidth=0), "w")
    np.testing.assert_allclose(image.pixels, minmax(pixels), atol=1e-6)
    assert any("window width" in w for w in image.meta.warnings)


def test_voi_lut_sequence_is_applied():
    pixels = ramp()
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    ds = make_dataset(pixels, bits_stored=12, VOILUTSequence=Sequence([item]))
    ours = decode_image(to_bytes(ds), "voi").pixels
    np.testing.assert_allclose(ours, lut[pixels] / 65535.0, atol=1e-6)


def test_modality_lut_sequence_is_applied():
    pixels = ramp()
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting modality LUT
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", lut.tolist())
    item.ModalityLUTType = "US"
    ds = make_dataset(pixels, bits_stored=12, ModalityLUTSequence=Sequence([item]))
    ours = decode_image(to_bytes(ds), "mlut").pixels
    np.testing.assert_allclose(ours, minmax(lut[pixels]), atol=1e-6)


def test_bits_stored_masks_unused_high_bits():
    pixels = ramp()
    dirty = pixels | np.uint16(0xF000)  # overlay / garbage in bits 12-15
    clean = decode_image(make_dicom(pixels, bits_stored=12), "clean").pixels
    masked = decode_image(make_dicom(dirty, bits_stored=12), "dirty").pixels
    np.testing.assert_array_equal(clean, masked)


def test_signed_pixels_keep_their_sign():
    pixels = (ramp().astype(np.int32) - 2048).astype(np.int16)
    image = decode_image(make_dicom(pixels, bits_stored=12), "signed")
    np.testing.assert_allclose(image.pixels, minmax(pixels), atol=1e-6)


def test_eight_bit_native():
    pixels = ramp(bits=8, dtype=np.uint8)
    image = decode_image(make_dicom(pixels), "u8")
    np.testing.assert_allclose(image.pixels, minmax(pixels), atol=1e-6)


def test_constant_image_is_zero_with_a_warning():
    image = decode_image(make_dicom(np.full((8, 8), 7, np.uint16), bits_stored=12), "flat")
    assert not image.pixels.any()
    assert "image is constant" in image.meta.warnings


# ------------------------------------------------------------------ compressed syntaxes


def _native_and(syntax) -> tuple[np.ndarray, np.ndarray]:
    pixels = ramp(96, 80)
    native = decode_image(make_dicom(pixels, bits_stored=12), "native").pixels
    image = decode_image(compressed(make_dataset(pixels, bits_stored=12), syntax), "compressed.dcm")
    assert image.meta.transfer_syntax_uid == str(syntax)
    return native, image.pixels


def test_rle_lossless_matches_uncompressed():
    native, decoded = _native_and(RLELossless)
    np.testing.assert_array_equal(native, decoded)


def test_jpeg2000_lossless_matches_uncompressed():
    native, decoded = _native_and(JPEG2000Lossless)
    np.testing.assert_array_equal(native, decoded)


def _textured(rows: int, cols: int, bits: int = 12) -> np.ndarray:
    """A smooth gradient plus noise: lossless JPEG 2000 has real wavelet levels to skip."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:rows, 0:cols]
    values = (np.sin(y / 37.0) + np.cos(x / 23.0) + 2) / 4 * (2**bits - 1)
    values += rng.normal(0, 40, (rows, cols))
    return np.clip(np.round(values), 0, 2**bits - 1).astype(np.uint16)


def test_jpeg2000_with_target_size_decodes_only_the_wavelet_levels_needed():
    pixels = _textured(512, 640)
    data = compressed(make_dataset(pixels, bits_stored=12), JPEG2000Lossless)
    full = decode_image(data, "j2k.dcm").pixels
    np.testing.assert_array_equal(full, decode_image(make_dicom(pixels, bits_stored=12), "n").pixels)
    small = decode_image(data, "j2k.dcm", target_size=100)
    # Two levels skipped (512 -> 256 -> 128, a third would give 64 < 100); the box reduction
    # of a full decode would have given 5x (102 x 128) instead.
    assert small.pixels.shape == (128, 160)
    assert (small.meta.rows, small.meta.cols) == (512, 640)  # meta keeps the stored size
    assert small.pixels.min() >= 0.0 and small.pixels.max() <= 1.0
    # What the model sees: the wavelet low-pass, resized, is close to the full decode resized.
    # (Measured 0.011 mean / 0.033 max; the box reduction of native pixels gives 0.007 / 0.025.
    # Most of it is the min-max window, taken on the smaller image whose noise is averaged out.)
    model_input = resize_square(small.pixels, 100)
    reference = resize_square(full, 100)
    assert np.abs(model_input - reference).mean() < 0.02
    assert np.abs(model_input - reference).max() < 0.06


def test_jpeg2000_at_full_size_when_the_target_needs_every_level():
    pixels = _textured(120, 150)
    data = compressed(make_dataset(pixels, bits_stored=12), JPEG2000Lossless)
    np.testing.assert_array_equal(
        decode_image(data, "j2k.dcm", target_size=100).pixels,
        decode_image(make_dicom(pixels, bits_stored=12), "n", target_size=100).pixels,
    )


def test_signed_jpeg2000_is_left_to_pydicom():
    pixels = _textured(256, 256).astype(np.int16) - 2048
    ds = make_dataset(pixels, bits_stored=12, PixelRepresentation=1)
    native = decode_image(to_bytes(make_dataset(pixels, bits_stored=12, PixelRepresentation=1)), "n", target_size=100)
    image = decode_image(compressed(ds, JPEG2000Lossless), "signed.dcm", target_size=100)
    np.testing.assert_array_equal(image.pixels, native.pixels)  # full decode, then the same box reduction


def test_wavelet_levels_to_skip_keep_both_sides_at_or_above_the_target():
    from cxr_ray.io.raster import wavelet_levels_to_skip

    assert wavelet_levels_to_skip(1280, 1280, 224) == 2  # 320 px; one more would be 160
    assert wavelet_levels_to_skip(2500, 2048, 224) == 3  # 256 px on the short side
    assert wavelet_levels_to_skip(447, 900, 224) == 1  # ceil(447 / 2) = 224
    assert wavelet_levels_to_skip(445, 900, 224) == 0  # 223
    assert wavelet_levels_to_skip(100, 100, 224) == 0
    assert wavelet_levels_to_skip(4000, 4000, None) == 0


def test_jpeg_ls_lossless_matches_uncompressed():
    if not get_encoder(JPEGLSLossless).is_available:
        pytest.skip("no JPEG-LS encoder installed (pydicom needs pyjpegls to write JPEG-LS)")
    native, decoded = _native_and(JPEGLSLossless)
    np.testing.assert_array_equal(native, decoded)


def jpeg_baseline_dicom(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", quality: int = 95
) -> bytes:
    """A DICOM whose frame is a JPEG written by Pillow (how scanners' JPEG Baseline looks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    ds = make_dataset(pixels, photometric=photometric, with_pixels=False)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return to_bytes(ds)


def test_jpeg_baseline_grey_decodes_within_codec_tolerance():
    pixels = ramp(128, 160, bits=8, dtype=np.uint8)
    image = decode_image(jpeg_baseline_dicom(pixels), "jpeg.dcm")
    assert np.abs(image.pixels - minmax(pixels)).mean() < 0.01


def test_jpeg_baseline_with_target_size_is_dct_scaled_but_covers_the_target():
    pixels = ramp(512, 640, bits=8, dtype=np.uint8)
    data = jpeg_baseline_dicom(pixels)
    full = decode_image(data, "jpeg.dcm").pixels
    small = decode_image(data, "jpeg.dcm", target_size=100)
    assert min(small.pixels.shape) >= 100 and small.pixels.shape[0] < 512
    assert (small.meta.rows, small.meta.cols) == (512, 640)  # meta keeps the stored size
    shrunk = np.asarray(
        Image.fromarray(full).resize(small.pixels.shape[::-1], Image.Resampling.BOX)
    )
    assert np.abs(shrunk - small.pixels).mean() < 0.02


def test_colour_jpeg_baseline_is_converted_to_luminance():
    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), 8, 0), 8, 1)
    image = decode_image(jpeg_baseline_dicom(rgb, photometric="YBR_FULL_422"), "ybr.dcm")
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert image.pixels.shape == rgb.shape[:2]
    assert np.abs(image.pixels - luma).mean() < 0.03
    assert any("colour image converted to grey" in w for w in image.meta.warnings)


def test_rgb_native_is_converted_to_luminance_with_a_warning():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = decode_image(
        make_dicom(rgb, photometric="RGB", sop_class=SECONDARY_CAPTURE, modality="OT"), "rgb"
    )
    expected = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)
    assert image.meta.warnings == ("RGB colour image converted to grey (luminance)",)


# ------------------------------------------------------------------ frames, views, size


def test_multi_frame_first_policy_decodes_frame_zero_with_a_warning():
    frames = np.stack([ramp(), 4095 - ramp(), ramp() // 2])
    data = make_dicom(
        frames, bits_stored=12, sop_class="1.2.840.10008.5.1.4.1.1.7.3", modality="OT"
    )
    with pytest.raises(DecodeError) as info:
        decode_image(data, "mf.dcm")
    assert info.value.code == "multi_frame"
    image = decode_image(data, "mf.dcm", policy=DecodePolicy(multi_frame="first"))
    np.testing.assert_allclose(image.pixels, minmax(frames[0]), atol=1e-6)
    assert image.meta.frames == 3
    assert any("only frame 0" in w for w in image.meta.warnings)


def test_missing_view_position_is_kept_with_a_warning():
    image = decode_image(make_dicom(view=None), "noview.dcm")
    assert image.meta.view_position is None
    assert "no ViewPosition; assumed frontal" in image.meta.warnings


def test_other_views_are_kept_with_a_warning_and_laterals_on_request():
    oblique = decode_image(make_dicom(view="RLO"), "o.dcm")
    assert any("neither PA nor AP" in w for w in oblique.meta.warnings)
    lateral = decode_image(
        make_dicom(view="LL"), "l.dcm", policy=DecodePolicy(reject_lateral=False)
    )
    assert lateral.meta.view_position == "LL"
    assert any("lateral" in w for w in lateral.meta.warnings)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case, as some exporters write
def test_view_position_is_normalised():
    assert decode_image(make_dicom(view="pa "), "v").meta.view_position == "PA"


def test_target_size_reduces_native_images_but_keeps_both_sides():
    pixels = ramp(700, 500)
    image = decode_image(make_dicom(pixels, bits_stored=12), "big.dcm", target_size=100)
    assert image.pixels.shape == (140, 100)  # 5x box reduction
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    full = decode_image(make_dicom(pixels, bits_stored=12), "big.dcm").pixels
    box = full.reshape(140, 5, 100, 5).mean(axis=(1, 3))
    assert np.abs(box - image.pixels).max() < 0.01


def test_max_pixels_comes_from_the_policy():
    with pytest.raises(DecodeError) as info:
        decode_image(make_dicom(), "small.dcm", policy=DecodePolicy(max_pixels=100))
    assert info.value.code == "too_large"


# ------------------------------------------------------------------ recognition, metadata


def test_bare_dataset_without_preamble_or_extension_decodes():
    pixels = ramp()
    image = decode_image(to_bytes(make_dataset(pixels, bits_stored=12), preamble=False), "IM0001")
    np.testing.assert_allclose(image.pixels, minmax(pixels), atol=1e-6)
    assert image.meta.transfer_syntax_uid == pydicom.uid.ImplicitVRLittleEndian


def test_metadata_and_pseudonyms():
    key = b"operator-secret"
    ds = make_dataset(bits_stored=12)
    image = decode_image(to_bytes(ds), "meta.dcm", pseudonym_key=key)
    meta = image.meta
    assert (meta.modality, meta.view_position, meta.sop_class_uid) == ("CR", "PA", CR_IMAGE)
    assert meta.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    assert meta.frames == 1 and meta.warnings == ()
    assert meta.patient_pseudonym == pseudonymize(PATIENT_ID, key)
    assert meta.study_pseudonym == pseudonymize(str(ds.StudyInstanceUID), key)
    assert meta.instance_pseudonym == pseudonymize(str(ds.SOPInstanceUID), key)
    assert len(meta.patient_pseudonym) == 64
    text = json.dumps(meta.to_dict())
    for secret in (PATIENT_ID, "Doe", "19700101", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
        assert secret not in text


def test_no_key_means_no_pseudonyms():
    meta = decode_image(make_dicom(), "nokey.dcm").meta
    assert meta.patient_pseudonym is meta.study_pseudonym is meta.instance_pseudonym is None


def test_pseudonym_ignores_dicom_padding():
    key = b"k"
    assert pseudonymize("ABC", key) != pseudonymize("ABD", key)
    padded = decode_image(
        make_dicom(PatientID="ABC "), "p", pseudonym_key=key
    ).meta.patient_pseudonym
    assert padded == pseudonymize("ABC", key)


def test_malformed_identifiers_never_reach_warnings(recwarn, caplog):
    ds = make_dataset(bits_stored=12)
    ds.PatientID = "LONG-PATIENT-ID-" + "7" * 60  # over the 64 characters LO allows
    ds.StudyInstanceUID = "1.2.3.not_a_valid_uid"
    data = to_bytes(ds)
    recwarn.clear()
    caplog.clear()
    meta = decode_image(data, "ids.dcm", pseudonym_key=b"k").meta
    assert meta.patient_pseudonym == pseudonymize(str(ds.PatientID), b"k")
    assert meta.study_pseudonym == pseudonymize("1.2.3.not_a_valid_uid", b"k")
    said = " ".join(str(w.message) for w in recwarn) + caplog.text
    assert "LONG-PATIENT-ID" not in said and "not_a_valid_uid" not in said
