"""Bytes -> grey float32 image in [0, 1] + metadata, or a :class:`DecodeError` with a code.

The format is decided by content, never by the file name: a ``.dcm`` that is
really a PNG decodes as PNG, and a DICOM file with no extension decodes as
DICOM. The name only appears in messages.

This is the single entry point train, screen, serve and ``inspect`` call; it
raises nothing but :class:`DecodeError` for any input, however malformed.
"""

from __future__ import annotations

from cxr_ray.errors import DecodeError
from cxr_ray.io import dicom, raster
from cxr_ray.io.deadline import call_with_deadline
from cxr_ray.io.types import DecodedImage, DecodePolicy

_DEFAULT_POLICY = DecodePolicy()

# Signatures of formats we do not decode, only to say what a refused file is.
_OTHER_SIGNATURES = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "RIFF/WebP"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def sniff_format(data: bytes) -> str | None:
    """``"dicom"``, ``"png"`` or ``"jpeg"`` from the content, or None."""
    if dicom.has_dicom_preamble(data):
        return "dicom"
    fmt = raster.sniff_raster(data)
    if fmt is not None:
        return fmt
    if dicom.looks_like_raw_dicom(data):
        return "dicom"
    return None


def decode_image(
    data: bytes,
    name: str,
    *,
    policy: DecodePolicy = _DEFAULT_POLICY,
    pseudonym_key: bytes | None = None,
    target_size: int | None = None,
) -> DecodedImage:
    """Decode one DICOM / PNG / JPEG file.

    ``pixels`` is float32 (H, W) in [0, 1], 1.0 = most attenuating (bone white).
    ``target_size`` is a hint: the decoder may return a smaller image (JPEG DCT
    scaling, integer box reduction) as long as both sides stay >= target_size;
    resize with :func:`cxr_ray.preprocess.resize_square` afterwards.
    ``meta.rows`` / ``meta.cols`` always give the stored image size.
    A decoder still running after ``policy.max_decode_seconds`` is abandoned:
    ``DecodeError("timeout")`` (:mod:`cxr_ray.io.deadline`).
    """
    if not data:
        raise DecodeError("empty", f"{name}: file is empty (0 bytes)")
    if not isinstance(data, bytes):  # bytearray / memoryview: the parsers want immutable bytes
        data = bytes(data)
    return call_with_deadline(
        lambda: _decode(data, name, policy, pseudonym_key, target_size), policy.max_decode_seconds, name
    )


def _decode(
    data: bytes, name: str, policy: DecodePolicy, pseudonym_key: bytes | None, target_size: int | None
) -> DecodedImage:
    try:
        fmt = sniff_format(data)
        if fmt == "dicom":
            return dicom.decode_dicom(
                data,
                name,
                policy=policy,
                pseudonym_key=pseudonym_key,
                target_size=target_size,
                preamble=dicom.has_dicom_preamble(data),
            )
        if fmt is not None:
            return raster.decode_raster(data, name, fmt, policy=policy, target_size=target_size)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("too_large", f"{name}: ran out of memory while decoding") from None
    except Exception as exc:  # a library failure mode nobody mapped yet: still a DecodeError
        raise DecodeError(
            "corrupt", f"{name}: could not be decoded ({type(exc).__name__})"
        ) from None
    raise DecodeError(
        "not_an_image", f"{name}: {_describe_unknown(data)}; expected DICOM, PNG or JPEG"
    )


def _describe_unknown(data: bytes) -> str:
    for signature, label in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return f"looks like {label}, which is not supported"
    head = data[:512]
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "looks like text, not an image"
    return f"no known image signature ({len(data)} bytes)"
