"""PNG / JPEG decoding through Pillow, guarded the same way as DICOM.

The size is checked from the header (``Image.open`` is lazy) before any pixel is
decompressed, Pillow's own decompression-bomb guard is turned into an error, and
only the PNG and JPEG plugins are ever consulted: Pillow can open dozens of
formats, some through external programs, and none of them belongs in a
screening pipeline.

``target_size`` lets JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's
``draft``), lets the JPEG 2000 frames of DICOM files decode only the wavelet
resolution levels needed (Pillow's ``reduce``), and lets every format shrink
by an integer box filter before the float conversion, always keeping both
sides >= ``target_size``: most of the cost of a 3000-pixel radiograph resized
to 224 is otherwise spent on pixels that the resize throws away.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_ray.errors import DecodeError
from cxr_ray.io.types import DecodedImage, DecodePolicy, ImageMetadata

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "jpeg2000": "JPEG2000"}  # JPEG 2000: DICOM frames only
# Shortest file that can hold a complete header: PNG signature + IHDR chunk;
# JPEG SOI + a minimal SOF. Anything shorter that Pillow cannot identify was cut off.
_MIN_HEADER = {"png": 8 + 25, "jpeg": 2 + 19, "jpeg2000": 2 + 41}  # J2K: SOC + a one-component SIZ
_UINT16_SCALE = np.float32(1.0 / 65535.0)
_UINT8_SCALE = np.float32(1.0 / 255.0)
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})


def sniff_raster(data: bytes) -> str | None:
    """``"png"`` or ``"jpeg"`` from the file signature, else None."""
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SIGNATURE:
        return "jpeg"
    return None


def reduction_factor(height: int, width: int, target_size: int | None) -> int:
    """Largest integer factor that keeps both sides >= ``target_size`` (1 = none)."""
    if not target_size or target_size <= 0:
        return 1
    return max(1, min(height // target_size, width // target_size))


def reduce_float(pixels: np.ndarray, target_size: int | None) -> np.ndarray:
    """Box-reduce a float32 (H, W) image by the largest factor allowed by ``target_size``.

    Returns ``pixels`` itself when no reduction applies, else a new writable array.
    """
    factor = reduction_factor(pixels.shape[0], pixels.shape[1], target_size)
    if factor < 2:
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # mode "F"
    return np.array(image.reduce(factor), dtype=np.float32)


def open_image(data: bytes, name: str, fmt: str, max_pixels: int) -> Image.Image:
    """Open (header only) a PNG or JPEG; refuse it before decoding if it is too large.

    The effective limit is ``max_pixels`` or Pillow's ``Image.MAX_IMAGE_PIXELS``
    (89.5 M by default), whichever is lower: Pillow's check runs inside
    ``Image.open``, before ours, and its warning is turned into ``too_large``.
    No process-wide setting is changed (``catch_warnings`` is scoped to the call).
    """
    label = fmt.upper()
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above:
            # both mean "too large" here, never a warning scrolled past in a log.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(
            "too_large", f"{name}: {label} dimensions exceed Pillow's decompression-bomb limit"
        ) from None
    except UnidentifiedImageError:
        if len(data) < _MIN_HEADER[fmt]:
            raise DecodeError(
                "truncated", f"{name}: {label} file ends inside its header ({len(data)} bytes)"
            ) from None
        raise DecodeError(
            "corrupt", f"{name}: {label} signature but the header is invalid"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _load_error(name, label, exc) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"{name}: {label} header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            "too_large",
            f"{name}: {label} is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} (DecodePolicy.max_pixels)",
        )
    return image


def _load_error(name: str, label: str, exc: BaseException) -> DecodeError:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError | struct.error):
        return DecodeError("truncated", f"{name}: {label} data ends early (file is truncated)")
    if "too large" in text:
        return DecodeError(
            "too_large", f"{name}: {label} has an oversized chunk ({type(exc).__name__})"
        )
    return DecodeError("corrupt", f"{name}: {label} data is corrupt ({type(exc).__name__})")


def load(image: Image.Image, name: str, fmt: str) -> None:
    """Decode the pixels of an opened image, mapping Pillow's errors to codes."""
    try:
        image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as exc:
        raise _load_error(name, fmt.upper(), exc) from None


def _draft_grey(image: Image.Image, target_size: int | None) -> None:
    # "L" makes libjpeg emit the luma channel directly (no RGB conversion); the
    # size asks for the smallest DCT scale (1/2, 1/4, 1/8) still covering target_size.
    image.draft("L", (target_size, target_size) if target_size else None)


def decode_jpeg_grey(
    data: bytes,
    name: str,
    max_pixels: int,
    target_size: int | None,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a JPEG stream straight to uint8 grey, DCT-scaled when ``target_size`` allows.

    Used for the JPEG Baseline frames inside DICOM files; ``expected_size``
    (width, height) is what the DICOM header says, and a mismatch is corrupt.
    """
    image = open_image(data, name, "jpeg", max_pixels)
    if expected_size is not None and image.size != expected_size:
        raise DecodeError(
            "corrupt", f"{name}: JPEG frame is {image.size}, the header says {expected_size}"
        )
    _draft_grey(image, target_size)
    load(image, name, "jpeg")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image)


def wavelet_levels_to_skip(height: int, width: int, target_size: int | None) -> int:
    """Most JPEG 2000 resolution levels that can be discarded with both sides still >= ``target_size``.

    Each level halves the image (rounding up, as the codestream's grid does).
    """
    if not target_size or target_size <= 0:
        return 0
    levels, side = 0, min(height, width)
    while -(-side // (2 ** (levels + 1))) >= target_size:
        levels += 1
    return levels


def decode_j2k_grey(
    data: bytes,
    name: str,
    max_pixels: int,
    target_size: int | None,
    expected_size: tuple[int, int],
    precision: int,
) -> np.ndarray:
    """Decode a one-component, unsigned JPEG 2000 frame of ``precision`` bits to its stored integers.

    Only the wavelet resolution levels that ``target_size`` needs are decoded:
    OpenJPEG stops the inverse transform early (a 1,280-pixel lossless frame
    wanted at 224: 15-18 ms instead of 200-220 ms here), and the low-pass band
    it returns is an antialiased downscale. ``expected_size`` (width,
    height) is what the DICOM header says; a mismatch is corrupt. Pillow
    returns samples scaled up to 8 or 16 bits; they are shifted back so the
    values are the stored ones the modality and VOI transforms expect.
    """
    image = open_image(data, name, "jpeg2000", max_pixels)
    if image.size != expected_size:
        raise DecodeError(
            "corrupt", f"{name}: JPEG 2000 frame is {image.size}, the header says {expected_size}"
        )
    container = {"L": 8, "I;16": 16}.get(image.mode)
    if container is None or not 1 <= precision <= container:
        raise DecodeError(
            "corrupt", f"{name}: JPEG 2000 frame of mode {image.mode} and {precision} bits"
        )
    image.reduce = wavelet_levels_to_skip(expected_size[1], expected_size[0], target_size)  # type: ignore[assignment, method-assign]
    load(image, name, "jpeg2000")
    pixels = np.asarray(image)
    if container > precision:
        pixels = pixels >> (container - precision)
    return pixels


def _grey_unit(image: Image.Image, target_size: int | None) -> np.ndarray:
    """Loaded Pillow image of any mode -> float32 (H, W) in [0, 1], possibly box-reduced."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (Pillow keeps 16-bit PNG as I;16; older versions gave I).
        pixels = np.asarray(image).astype(np.float32)
        if mode == "I":
            np.clip(pixels, 0.0, 65535.0, out=pixels)
        pixels = reduce_float(pixels, target_size)
        pixels *= _UINT16_SCALE
        return pixels
    if mode != "L":
        # RGB / RGBA / LA / P / 1 / CMYK: ITU-R 601-2 luma, alpha ignored.
        image = image.convert("L")
    factor = reduction_factor(image.height, image.width, target_size)
    if factor >= 2:
        image = image.reduce(factor)  # uint8 box filter: cheaper than reducing floats
    pixels = np.asarray(image).astype(np.float32)
    pixels *= _UINT8_SCALE
    return pixels


def _photometric(mode: str) -> str:
    if mode in _GREY_MODES:
        return "MONOCHROME2"
    if mode in ("P", "PA"):
        return "PALETTE COLOR"
    return "RGB"


def _bits(mode: str) -> int:
    if mode.startswith("I"):
        return 16
    return 1 if mode == "1" else 8


def decode_raster(
    data: bytes,
    name: str,
    fmt: str,
    *,
    policy: DecodePolicy,
    target_size: int | None = None,
) -> DecodedImage:
    """Decode a PNG or JPEG (``fmt`` from :func:`sniff_raster`) to grey float32 in [0, 1].

    8-bit values are divided by 255 and 16-bit values by 65535, i.e. the file's
    display intent is kept, never stretched. Colour is converted to luminance
    (alpha ignored). EXIF orientation is not applied (radiographs do not use it).
    """
    image = open_image(data, name, fmt, policy.max_pixels)
    width, height = image.size
    mode = image.mode
    if fmt == "jpeg":
        _draft_grey(image, target_size)
    load(image, name, fmt)
    try:
        pixels = _grey_unit(image, target_size)
    except (OSError, ValueError) as exc:  # a mode Pillow cannot convert
        raise DecodeError(
            "corrupt",
            f"{name}: {fmt.upper()} mode {mode} cannot be converted to grey ({type(exc).__name__})",
        ) from None
    return DecodedImage(pixels=pixels, meta=raster_metadata(fmt, width, height, mode))


def raster_metadata(fmt: str, width: int, height: int, mode: str) -> ImageMetadata:
    """What outputs say about a PNG / JPEG of Pillow mode ``mode`` (both decode paths)."""
    return ImageMetadata(
        format=fmt, rows=height, cols=width, photometric_interpretation=_photometric(mode), bits_stored=_bits(mode)
    )
