"""Real sample X-rays (../shared/data/real): they decode, and the MONOCHROME1 twin inverts."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from cxr_ray.io.decode import decode_image, sniff_format
from cxr_ray.io.pseudonym import pseudonymize

RSNA = "rsna-pneumonia-sample.dcm"
RSNA_MONOCHROME1 = "rsna-pneumonia-sample-monochrome1.dcm"


def raster_files(root):
    paths = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")
    ]
    assert paths, f"no PNG/JPEG under {root}"
    return paths


def test_rsna_dicom_metadata(real_data_dir):
    data = (real_data_dir / RSNA).read_bytes()
    image = decode_image(data, RSNA, pseudonym_key=b"k")
    meta = image.meta
    assert (meta.format, meta.modality, meta.view_position) == ("dicom", "CR", "PA")
    assert (meta.rows, meta.cols, meta.bits_stored, meta.frames) == (1024, 1024, 8, 1)
    assert meta.transfer_syntax_uid == pydicom.uid.JPEGBaseline8Bit
    assert meta.photometric_interpretation == "MONOCHROME2"
    patient_id = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).PatientID)
    assert meta.patient_pseudonym == pseudonymize(patient_id, b"k")
    assert patient_id not in str(meta.to_dict())
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (1024, 1024)


@pytest.mark.parametrize("target_size", [None, 224])
def test_rsna_monochrome1_twin_is_the_inverse(real_data_dir, target_size):
    a = decode_image((real_data_dir / RSNA).read_bytes(), RSNA, target_size=target_size).pixels
    b = decode_image(
        (real_data_dir / RSNA_MONOCHROME1).read_bytes(), RSNA_MONOCHROME1, target_size=target_size
    ).pixels
    assert a.shape == b.shape
    np.testing.assert_allclose(1.0 - a, b, atol=1e-6)
    assert a.std() > 0.1  # a real radiograph, not a flat field


def _pydicom_minmax(data: bytes, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    values = pixel_array(pydicom.dcmread(io.BytesIO(data)), decoding_plugin=plugin).astype(
        np.float64
    )
    return (values - values.min()) / (values.max() - values.min())


def test_rsna_jpeg_baseline_matches_pydicom(real_data_dir):
    data = (real_data_dir / RSNA).read_bytes()
    ours = decode_image(data, RSNA).pixels
    # Same codec (libjpeg-turbo through Pillow) as pydicom's "pillow" plugin: identical.
    np.testing.assert_allclose(ours, _pydicom_minmax(data, "pillow"), atol=1e-6)
    # libjpeg 9 (pylibjpeg) rounds a few coefficients differently: +-1 grey level.
    difference = np.abs(ours - _pydicom_minmax(data, "pylibjpeg"))
    assert difference.mean() < 1 / 255 and difference.max() <= 3 / 255


def test_rsna_target_size_is_dct_scaled(real_data_dir):
    image = decode_image((real_data_dir / RSNA).read_bytes(), RSNA, target_size=224)
    assert image.pixels.shape == (256, 256)  # 1/4 DCT scale: the smallest covering 224
    assert (image.meta.rows, image.meta.cols) == (1024, 1024)


def test_every_real_png_and_jpeg_decodes(real_data_dir):
    for path in raster_files(real_data_dir):
        data = path.read_bytes()
        image = decode_image(data, path.name)
        assert image.meta.format == sniff_format(data) in ("png", "jpeg"), path.name
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert image.pixels.shape == (image.meta.rows, image.meta.cols)
        assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
        assert image.pixels.std() > 0.02, f"{path.name} decoded to a near-flat image"


def test_every_real_png_and_jpeg_decodes_for_a_target_size(real_data_dir):
    for path in raster_files(real_data_dir):
        image = decode_image(path.read_bytes(), path.name, target_size=224)
        rows, cols = image.pixels.shape
        assert min(rows, cols) >= min(224, image.meta.rows, image.meta.cols), path.name
        assert rows <= image.meta.rows and cols <= image.meta.cols
