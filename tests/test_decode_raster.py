"""PNG / JPEG decoding through Pillow: every mode to grey float32 in [0, 1]."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_ray.io.decode import decode_image, sniff_format
from cxr_ray.io.raster import reduction_factor


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def grey8(shape=(40, 60), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth8(shape=(240, 320)) -> np.ndarray:
    """A smooth image (JPEG-friendly) with the full 0..255 range."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.round(127.5 + 127.5 * np.sin(rows / 17.0) * np.cos(cols / 23.0)).astype(np.uint8)


def check_unit(pixels: np.ndarray) -> None:
    assert pixels.dtype == np.float32 and pixels.ndim == 2
    assert pixels.flags.c_contiguous and pixels.flags.writeable
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


def test_png_8bit_grey_is_divided_by_255():
    pixels = grey8()
    image = decode_image(encode(Image.fromarray(pixels)), "a.png")
    check_unit(image.pixels)
    np.testing.assert_allclose(image.pixels, pixels / 255.0, atol=1e-6)
    meta = image.meta
    assert (meta.format, meta.rows, meta.cols, meta.bits_stored) == ("png", 40, 60, 8)
    assert meta.photometric_interpretation == "MONOCHROME2" and meta.modality is None


def test_png_16bit_grey_keeps_its_precision():
    pixels = np.random.default_rng(1).integers(0, 65536, (30, 50), dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(pixels)), "b.png")
    check_unit(image.pixels)
    np.testing.assert_allclose(image.pixels, pixels / 65535.0, atol=1e-7)
    assert image.meta.bits_stored == 16


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_colour_becomes_luminance_and_alpha_is_ignored(mode):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pixels = rgb if mode == "RGB" else np.dstack([rgb, np.full((20, 30), 100, np.uint8)])
    image = decode_image(encode(Image.fromarray(pixels, mode)), "c.png")
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    np.testing.assert_allclose(image.pixels, luma, atol=1e-6)
    assert image.meta.photometric_interpretation == "RGB"


def test_png_grey_with_alpha():
    grey = grey8((10, 12))
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(np.zeros_like(grey))])
    image = decode_image(encode(la), "d.png")
    np.testing.assert_allclose(image.pixels, grey / 255.0, atol=1e-6)


def test_png_palette_uses_the_palette_luminance():
    grey = grey8((16, 16))
    palette_image = Image.fromarray(grey).convert("RGB").quantize(colors=16)
    image = decode_image(encode(palette_image), "e.png")
    expected = np.asarray(palette_image.convert("L")) / 255.0
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.meta.photometric_interpretation == "PALETTE COLOR"


def test_png_bilevel():
    bits = grey8((8, 16)) > 127
    image = decode_image(encode(Image.fromarray(bits)), "f.png")
    np.testing.assert_array_equal(image.pixels, bits.astype(np.float32))
    assert image.meta.bits_stored == 1


def test_32bit_integer_images_are_read_as_16bit():
    from cxr_ray.io.raster import _grey_unit

    values = np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32)
    pixels = _grey_unit(Image.fromarray(values, "I"), None)
    np.testing.assert_allclose(pixels, np.clip(values, 0, 65535) / 65535.0, atol=1e-7)


def test_jpeg_grey_and_colour_within_codec_tolerance():
    pixels = smooth8()
    grey = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95), "g.jpg")
    check_unit(grey.pixels)
    assert grey.meta.format == "jpeg" and grey.meta.photometric_interpretation == "MONOCHROME2"
    assert np.abs(grey.pixels - pixels / 255.0).mean() < 0.01
    colour = np.dstack([pixels, pixels, pixels])
    rgb = decode_image(encode(Image.fromarray(colour), "JPEG", quality=95), "h.jpg")
    assert rgb.meta.photometric_interpretation == "RGB"
    assert np.abs(rgb.pixels - pixels / 255.0).mean() < 0.01


def test_jpeg_cmyk_is_converted():
    cmyk = Image.fromarray(smooth8((32, 32))).convert("CMYK")
    image = decode_image(encode(cmyk, "JPEG"), "cmyk.jpg")
    check_unit(image.pixels)
    assert image.pixels.shape == (32, 32)


def test_jpeg_target_size_uses_dct_scaling_and_covers_the_target():
    pixels = smooth8((960, 1200))
    data = encode(Image.fromarray(np.dstack([pixels] * 3)), "JPEG", quality=95)
    full = decode_image(data, "big.jpg").pixels
    small = decode_image(data, "big.jpg", target_size=224)
    check_unit(small.pixels)
    assert min(small.pixels.shape) >= 224 and small.pixels.shape[0] < 960
    assert (small.meta.rows, small.meta.cols) == (960, 1200)
    reference = np.asarray(
        Image.fromarray(full).resize(small.pixels.shape[::-1], Image.Resampling.BOX)
    )
    assert np.abs(reference - small.pixels).mean() < 0.01


def test_png_target_size_box_reduces_and_covers_the_target():
    pixels = smooth8((500, 700))
    image = decode_image(encode(Image.fromarray(pixels)), "big.png", target_size=100)
    assert image.pixels.shape == (100, 140)
    box = pixels.reshape(100, 5, 140, 5).mean(axis=(1, 3)) / 255.0
    assert np.abs(box - image.pixels).max() < 1.5 / 255


def test_target_size_never_enlarges_or_undershoots():
    assert reduction_factor(100, 100, 224) == 1
    assert reduction_factor(500, 300, 224) == 1
    assert reduction_factor(1000, 900, 224) == 4
    assert reduction_factor(1000, 900, None) == 1
    small = decode_image(encode(Image.fromarray(grey8((50, 60)))), "s.png", target_size=224)
    assert small.pixels.shape == (50, 60)


def test_format_is_decided_by_content():
    png = encode(Image.fromarray(grey8((4, 4))))
    jpeg = encode(Image.fromarray(grey8((8, 8))), "JPEG")
    assert sniff_format(png) == "png" and sniff_format(jpeg) == "jpeg"
    assert decode_image(png, "really-a-png.jpg").meta.format == "png"
    assert decode_image(jpeg, "really-a-jpeg.png").meta.format == "jpeg"
    assert decode_image(png, "no_extension").meta.format == "png"
