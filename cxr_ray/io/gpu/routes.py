"""Which inputs a GPU codec decodes, and for the others the reason they go to the CPU decoder.

Plain rules on the checked header (no torch, no nvImageCodec), so they are tested anywhere. An
input routed to the CPU is decoded by :func:`cxr_ray.io.inputs.load_input`, exactly as with
``--decode cpu``, and its row carries ``decoded on the CPU: <reason>`` in ``warnings``.

GPU codecs (nvImageCodec 0.9): nvJPEG for JPEG Baseline and JPEG Lossless frames and JPEG files,
nvJPEG2000 for JPEG 2000 and HTJ2K frames. Native (uncompressed) frames need no codec: their
stored values are copied to the device as they are. Everything else is the CPU's:

* colour DICOM (the luminance conversion is written once, on the CPU path);
* RLE, JPEG-LS, JPEG Extended (12-bit) and big-endian frames: no GPU decoder here;
* signed compressed frames, and JPEG 2000 codestreams whose precision is not BitsStored
  (pydicom reconciles those; the GPU path would have to guess);
* PNG files: nvImageCodec's PNG decoder runs on the CPU (OpenCV), so Pillow does it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

from cxr_ray.io.dicom.header import Header

NATIVE = "native"
JPEG = "jpeg"
JPEG2000_CODEC = "jpeg2000"
HTJ2K_CODEC = "htj2k"
GPU_CODECS: dict[UID, str] = {
    JPEGBaseline8Bit: JPEG,
    JPEGLossless: JPEG,
    JPEGLosslessSV1: JPEG,
    JPEG2000Lossless: JPEG2000_CODEC,
    JPEG2000: JPEG2000_CODEC,
    HTJ2KLossless: HTJ2K_CODEC,
    HTJ2KLosslessRPCL: HTJ2K_CODEC,
    HTJ2K: HTJ2K_CODEC,
}
GPU_JPEG_MODES = frozenset({"L", "RGB", "YCbCr"})  # 8-bit JPEG files nvJPEG decodes straight to luma


@dataclass(frozen=True)
class Route:
    """``codec`` (``native``, ``jpeg``, ``jpeg2000``, ``htj2k``) for the GPU, or None and the ``reason``."""

    codec: str | None
    reason: str | None = None

    @property
    def on_gpu(self) -> bool:
        return self.codec is not None


def cpu(reason: str) -> Route:
    return Route(None, reason)


def dicom_route(hdr: Header, stream_precision: int | None = None, stream_signed: bool = False) -> Route:
    """Where frame 0 of a checked DICOM header is decoded. ``stream_*``: what a JPEG 2000
    codestream's own header declares (:func:`cxr_ray.io.dicom.pixels.read_codestream`)."""
    ts = hdr.transfer_syntax
    if hdr.samples != 1:
        return cpu(f"colour DICOM ({hdr.photometric}) is converted to grey on the CPU")
    if hdr.bits_allocated not in (8, 16):
        return cpu(f"BitsAllocated {hdr.bits_allocated} has no GPU path")
    if not ts.is_encapsulated:
        return Route(NATIVE) if hdr.little_endian else cpu(f"{ts.name} (big endian) has no GPU path")
    codec = GPU_CODECS.get(ts)
    if codec is None:
        return cpu(f"no GPU codec for {ts.name}")
    if hdr.pixel_representation == 1 or stream_signed:
        return cpu(f"signed {ts.name} frames are decoded on the CPU")
    if codec != JPEG and stream_precision is not None and stream_precision != hdr.bits_stored:
        return cpu(f"the {ts.name} codestream has {stream_precision}-bit samples, BitsStored is {hdr.bits_stored}")
    return Route(codec)


def raster_route(fmt: str, mode: str) -> Route:
    """Where a PNG / JPEG file of Pillow mode ``mode`` is decoded."""
    if fmt == "jpeg":
        return Route(JPEG) if mode in GPU_JPEG_MODES else cpu(f"JPEG of mode {mode} has no GPU path")
    return cpu(f"{fmt.upper()} files are decoded on the CPU (nvImageCodec has no GPU decoder for them)")
