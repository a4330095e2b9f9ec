"""DICOM decoding: every check the header allows, before any pixel is decoded.

Order of work (cheap and refusing first):

1. Parse the header with pydicom (``stop_before_pixels``): pixel data are
   never read into a Python object, so a file that is refused costs one
   header parse.
2. Refuse what is not a frontal projection radiograph: SOP class allow-list,
   modality, view position, frame count, pixel count (rows x cols x samples x
   frames decoded), transfer syntax (a decoder plugin must be installed),
   photometric interpretation.
3. Locate the Pixel Data element in the original bytes and check its extent:
   native data must be as long as the header says, encapsulated data must
   have every item and the sequence delimiter present. Either failing is
   ``truncated``; no decoder sees a short buffer.
4. Decode one frame with pydicom's decoder (a zero-copy view for native
   syntaxes), or, when the caller only needs ``target_size`` pixels, hand
   the frame to Pillow: 8-bit grey JPEG Baseline at reduced DCT scale, and
   unsigned grey JPEG 2000 with only the wavelet levels needed (about 15x
   faster than a full decode for a 1,280-pixel image at 224).
5. Modality LUT / rescale, VOI LUT / window (min-max when neither is present),
   MONOCHROME1 inversion, all in float32 in place.

Policy decisions worth knowing:

* Colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT) are converted
  to luminance (ITU-R 601 weights, as Pillow's ``convert("L")``) with a
  warning; PALETTE COLOR and the retired YBR_PARTIAL_* are refused with
  ``unsupported_photometric``.
* Deflated transfer syntax is refused (``unsupported_transfer_syntax``):
  pydicom inflates the whole dataset, pixels included, before the header can
  be checked, which defeats the size guard. No X-ray modality writes it.
* Float Pixel Data is reported as ``no_pixel_data`` (no radiograph uses it).
* Presentation LUT Shape is ignored: for CR/DX it only restates what
  MONOCHROME1/2 already says.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import pydicom
from openjpeg import get_parameters  # pylibjpeg-openjpeg: pydicom's JPEG 2000 plugin
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import as_pixel_options, get_decoder

# Private, but the only JPEG / JPEG-LS header parser that does not decode: see _read_codestream.
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from cxr_ray.errors import DecodeError
from cxr_ray.io import raster
from cxr_ray.io.pseudonym import pseudonym_or_none
from cxr_ray.io.types import FRONTAL_VIEWS, DecodedImage, DecodePolicy, ImageMetadata

# SOP classes that hold a single 2-D projection radiograph (or a capture of one).
ALLOWED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    # Multi-frame SC variants: accepted, then the frame-count policy applies.
    # (Multi-frame Single Bit SC, ...7.1, is not: a 1-bit image is no radiograph.)
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
GREY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009})
_ANY_PIXEL_DATA = _FLOAT_PIXEL_DATA | {_PIXEL_DATA}
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ALL_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_JPEG_FAMILY = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------- recognition


def has_dicom_preamble(data: bytes) -> bool:
    """The standard DICOM file signature: 128-byte preamble then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def looks_like_raw_dicom(data: bytes) -> bool:
    """Conservative test for a DICOM dataset written without preamble / ``DICM``.

    Such files (old ACR-NEMA style exports) start directly with an element of
    group 0002 or 0008 in little-endian order. We require that, plus either a
    valid explicit VR or a short, even implicit length; random bytes pass this
    with probability ~1e-8, and the caller still insists the parsed dataset has
    a SOP class or image dimensions.
    """
    if len(data) < 16:
        return False
    group, element = struct.unpack_from("<HH", data, 0)
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if data[4:6] in _ALL_VRS:
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length % 2 == 0 and length <= min(1024, len(data) - 8)


# ---------------------------------------------------------------- header


@dataclass
class _Header:
    sop_class: str | None
    modality: str | None
    view: str | None
    photometric: str | None
    rows: int
    cols: int
    samples: int
    frames: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax: UID
    implicit_vr: bool
    little_endian: bool
    warnings: list[str] = field(default_factory=list)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip(" \x00").upper()
    return text or None


def _int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    return int(value)


def _read_header(data: bytes, name: str, preamble: bool, max_header_bytes: int) -> tuple[Dataset, int]:
    """Parse everything before Pixel Data; return the dataset and the offset where it stopped.

    Only the first ``max_header_bytes`` are handed to pydicom: a header that does
    not reach Pixel Data within them is ``too_large``, whatever it holds.
    """
    if preamble and _declares_deflate(data):
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"{name}: Deflated Explicit VR Little Endian is not accepted (the whole dataset "
            "would be inflated before its size could be checked)",
        )
    windowed = len(data) > max_header_bytes
    head = data[:max_header_bytes] if windowed else data

    def too_large() -> DecodeError:
        return DecodeError(
            "too_large",
            f"{name}: DICOM header (everything before Pixel Data) is over {max_header_bytes} bytes "
            "(DecodePolicy.max_header_bytes)",
        )

    fp = BytesIO(head)
    try:
        ds = pydicom.dcmread(fp, force=not preamble, stop_before_pixels=True)
    except InvalidDicomError:
        code = "corrupt" if preamble else "not_an_image"
        raise DecodeError(code, f"{name}: not a readable DICOM dataset") from None
    except (EOFError, struct.error):
        if windowed:
            raise too_large() from None
        raise DecodeError(
            "truncated", f"{name}: DICOM header ends early (file is truncated)"
        ) from None
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise DecodeError(
            "corrupt", f"{name}: DICOM header could not be parsed ({type(exc).__name__})"
        ) from None
    if windowed and not _at_pixel_data(head, fp.tell(), ds):
        raise too_large()
    return ds, fp.tell()


def _at_pixel_data(data: bytes, pos: int, ds: Dataset) -> bool:
    """Whether the parse stopped at a (Float / Double Float) Pixel Data element, not at the end."""
    if pos + 4 > len(data):
        return False
    little = ds.original_encoding[1] is not False
    group, element = struct.unpack_from("<HH" if little else ">HH", data, pos)
    return (group << 16 | element) in _ANY_PIXEL_DATA


def _declares_deflate(data: bytes) -> bool:
    # File Meta group length sits at 140..144 when (0002,0000) is the first meta element.
    end = 2048
    if data[132:138] == b"\x02\x00\x00\x00UL" and len(data) >= 144:
        end = 144 + struct.unpack_from("<I", data, 140)[0]
    return DeflatedExplicitVRLittleEndian.encode() in data[132 : min(end, 4096)]


def _recognisable(ds: Dataset) -> bool:
    """Parsed into something a DICOM writer produced (not noise behind a DICM marker)."""
    meta = getattr(ds, "file_meta", None)
    return any(keyword in ds for keyword in ("SOPClassUID", "Rows", "Modality")) or bool(
        meta is not None and meta.get("MediaStorageSOPClassUID")
    )


def _header_truncated(ds: Dataset, data_len: int, preamble: bool, recognisable: bool) -> bool:
    """True when the file visibly ends inside the header (pydicom reads short values silently)."""
    meta = getattr(ds, "file_meta", None)
    meta_len = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    # A real File Meta group is a few hundred bytes; noise "claims" gigabytes.
    if preamble and isinstance(meta_len, int) and meta_len < 65536 and 144 + meta_len > data_len:
        return True
    if not recognisable or not len(ds):
        return False
    raw = ds.get_item(next(reversed(ds.keys())))
    return (
        isinstance(raw, RawDataElement)
        and raw.length != _UNDEFINED_LENGTH
        and raw.value is not None
        and len(raw.value) < raw.length
    )


def _transfer_syntax(ds: Dataset) -> tuple[UID, bool, bool]:
    implicit, little = ds.original_encoding
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid).strip(" \x00")), bool(implicit), bool(little)
    if implicit is None:  # nothing was read at all
        implicit, little = True, True
    if implicit:
        return ImplicitVRLittleEndian, True, True
    return (ExplicitVRLittleEndian if little else ExplicitVRBigEndian), False, bool(little)


def _parse_header(ds: Dataset, name: str) -> _Header:
    try:
        ts, implicit, little = _transfer_syntax(ds)
        sop = _text(ds, "SOPClassUID")
        if sop is None and hasattr(ds, "file_meta"):
            sop = _text(ds.file_meta, "MediaStorageSOPClassUID")
        frames = _int(ds, "NumberOfFrames", 1) or 1
        return _Header(
            sop_class=sop,
            modality=_text(ds, "Modality"),
            view=_text(ds, "ViewPosition"),
            photometric=_text(ds, "PhotometricInterpretation"),
            rows=_int(ds, "Rows", 0) or 0,
            cols=_int(ds, "Columns", 0) or 0,
            samples=_int(ds, "SamplesPerPixel", 1) or 1,
            frames=frames,
            bits_allocated=_int(ds, "BitsAllocated", 0) or 0,
            bits_stored=_int(ds, "BitsStored", None) or _int(ds, "BitsAllocated", 0) or 0,
            pixel_representation=_int(ds, "PixelRepresentation", 0) or 0,
            transfer_syntax=ts,
            implicit_vr=implicit,
            little_endian=little,
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(
            "corrupt",
            f"{name}: DICOM header has an unreadable image attribute ({type(exc).__name__})",
        ) from None


def _check_object(hdr: _Header, policy: DecodePolicy, name: str) -> None:
    """SOP class, modality and view: is this a frontal projection radiograph at all?"""
    allowed = policy.allowed_modalities
    if hdr.sop_class is None:
        hdr.warnings.append("no SOP Class UID; accepted on modality alone")
    elif hdr.sop_class not in ALLOWED_SOP_CLASSES:
        uid_name = UID(hdr.sop_class).name
        # An image of another modality (CT, MR, MG...) is a modality problem; anything
        # else (SR, presentation state, waveform, ...) is not an image at all.
        if "Image Storage" in uid_name and hdr.modality and hdr.modality not in allowed:
            raise DecodeError(
                "unsupported_modality",
                f"{name}: modality {hdr.modality} ({uid_name}) is not a projection radiograph; "
                f"accepted modalities: {sorted(allowed)}",
            )
        raise DecodeError(
            "unsupported_sop_class",
            f"{name}: SOP class {hdr.sop_class} ({uid_name}) is not an accepted radiograph class; "
            f"accepted: {sorted(ALLOWED_SOP_CLASSES.values())}",
        )
    if hdr.modality is None:
        hdr.warnings.append("no Modality; accepted on SOP class alone")
    elif hdr.modality not in allowed:
        raise DecodeError(
            "unsupported_modality",
            f"{name}: modality {hdr.modality} is not accepted; accepted modalities: {sorted(allowed)}",
        )
    if hdr.view is None:
        hdr.warnings.append("no ViewPosition; assumed frontal")
    elif hdr.view in LATERAL_VIEWS:
        if policy.reject_lateral:
            raise DecodeError(
                "lateral_view",
                f"{name}: ViewPosition {hdr.view} is a lateral view; only frontal views "
                f"{sorted(FRONTAL_VIEWS)} are screened (DecodePolicy.reject_lateral)",
            )
        hdr.warnings.append(f"lateral view {hdr.view} kept (reject_lateral is off)")
    elif hdr.view not in FRONTAL_VIEWS:
        hdr.warnings.append(f"ViewPosition {hdr.view} is neither PA nor AP; kept")


def _check_image(hdr: _Header, policy: DecodePolicy, name: str) -> None:
    """Dimensions, frame count, pixel count, decoder availability and photometric."""
    if hdr.rows <= 0 or hdr.cols <= 0:
        raise DecodeError(
            "corrupt", f"{name}: Rows/Columns missing or zero ({hdr.rows}x{hdr.cols})"
        )
    if hdr.samples not in (1, 3):
        raise DecodeError("corrupt", f"{name}: SamplesPerPixel {hdr.samples} is not 1 or 3")
    if hdr.bits_allocated not in (1, 8, 16, 32) or not 0 < hdr.bits_stored <= hdr.bits_allocated:
        raise DecodeError(
            "corrupt",
            f"{name}: BitsAllocated {hdr.bits_allocated} / BitsStored {hdr.bits_stored} are invalid",
        )
    if hdr.frames < 1:
        raise DecodeError("corrupt", f"{name}: NumberOfFrames {hdr.frames} is invalid")
    decoded_frames = hdr.frames
    if hdr.frames > 1:
        if policy.multi_frame != "first":
            raise DecodeError(
                "multi_frame",
                f"{name}: {hdr.frames} frames; a radiograph has one "
                "(DecodePolicy.multi_frame='first' screens frame 0)",
            )
        hdr.warnings.append(f"{hdr.frames} frames; only frame 0 decoded")
        decoded_frames = 1
    pixels = hdr.rows * hdr.cols * hdr.samples * decoded_frames
    if pixels > policy.max_pixels:
        raise DecodeError(
            "too_large",
            f"{name}: {hdr.rows}x{hdr.cols}x{hdr.samples} samples x {decoded_frames} frame(s) = "
            f"{pixels} values; the limit is {policy.max_pixels} (DecodePolicy.max_pixels)",
        )
    ts = hdr.transfer_syntax
    if ts == DeflatedExplicitVRLittleEndian:
        raise DecodeError(
            "unsupported_transfer_syntax", f"{name}: deflated transfer syntax is not accepted"
        )
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError):
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"{name}: no pixel decoder exists for transfer syntax {ts} ({ts.name})",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"{name}: transfer syntax {ts} ({ts.name}) needs {missing}",
        )
    photometric = hdr.photometric
    if photometric is None:
        if hdr.samples != 1:
            raise DecodeError(
                "corrupt", f"{name}: PhotometricInterpretation missing on a colour image"
            )
        hdr.warnings.append("no PhotometricInterpretation; assumed MONOCHROME2")
        hdr.photometric = "MONOCHROME2"
    elif photometric in GREY_PHOTOMETRICS:
        if hdr.samples != 1:
            raise DecodeError(
                "corrupt", f"{name}: {photometric} with SamplesPerPixel {hdr.samples}"
            )
    elif photometric in COLOUR_PHOTOMETRICS:
        if hdr.samples != 3:
            raise DecodeError(
                "corrupt", f"{name}: {photometric} with SamplesPerPixel {hdr.samples}"
            )
        hdr.warnings.append(f"{photometric} colour image converted to grey (luminance)")
    else:
        raise DecodeError(
            "unsupported_photometric",
            f"{name}: PhotometricInterpretation {photometric} is not supported; accepted: "
            f"{sorted(GREY_PHOTOMETRICS | COLOUR_PHOTOMETRICS)}",
        )


# ---------------------------------------------------------------- pixel data extent


def _pixel_source(
    data: bytes, pos: int, hdr: _Header, name: str, header_cut: bool
) -> bytes | memoryview:
    """The Pixel Data value, checked to be complete: a zero-copy view when native."""
    if len(data) - pos < 8:
        if header_cut:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside its header")
        raise DecodeError("no_pixel_data", f"{name}: DICOM object has no Pixel Data")
    endian = "<" if hdr.little_endian else ">"
    group, element = struct.unpack_from(endian + "HH", data, pos)
    tag = group << 16 | element
    if tag in _FLOAT_PIXEL_DATA:
        raise DecodeError(
            "no_pixel_data", f"{name}: only Float Pixel Data, which radiographs never use"
        )
    if tag != _PIXEL_DATA:
        raise DecodeError(
            "corrupt", f"{name}: unexpected element ({group:04X},{element:04X}) at pixel data"
        )
    if hdr.implicit_vr:
        (length,) = struct.unpack_from(endian + "I", data, pos + 4)
        start = pos + 8
    elif data[pos + 4 : pos + 6] in _LONG_VRS:
        if len(data) - pos < 12:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside the Pixel Data header")
        (length,) = struct.unpack_from(endian + "I", data, pos + 8)
        start = pos + 12
    else:
        (length,) = struct.unpack_from(endian + "H", data, pos + 6)
        start = pos + 8
    view = memoryview(data)
    if hdr.transfer_syntax.is_encapsulated:
        if length != _UNDEFINED_LENGTH:
            raise DecodeError(
                "corrupt", f"{name}: compressed transfer syntax but Pixel Data is not encapsulated"
            )
        # pydicom's frame parser needs bytes (or a file); the compressed stream is small.
        return bytes(view[start : _encapsulated_end(data, start, name)])
    if length == _UNDEFINED_LENGTH:
        raise DecodeError(
            "corrupt", f"{name}: native transfer syntax but Pixel Data is encapsulated"
        )
    expected = _native_length(hdr)
    available = min(length, len(data) - start)
    if available < expected:
        raise DecodeError(
            "truncated",
            f"{name}: Pixel Data holds {available} bytes; the header ({hdr.rows}x{hdr.cols}, "
            f"{hdr.samples} sample(s), {hdr.bits_allocated} bits, {hdr.frames} frame(s)) needs {expected}",
        )
    return view[start : start + expected]


def _native_length(hdr: _Header) -> int:
    values = hdr.rows * hdr.cols * hdr.frames
    if hdr.photometric == "YBR_FULL_422":  # native 4:2:2 stores 2 samples per pixel
        return values * 2 * hdr.bits_allocated // 8
    if hdr.bits_allocated == 1:
        return math.ceil(values * hdr.samples / 8)
    return values * hdr.samples * hdr.bits_allocated // 8


def _encapsulated_end(data: bytes, start: int, name: str) -> int:
    """Walk the items of encapsulated Pixel Data; return the offset of the sequence delimiter."""
    pos, size = start, len(data)
    while True:
        if pos + 8 > size:
            raise DecodeError(
                "truncated", f"{name}: encapsulated Pixel Data ends before its delimiter"
            )
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if (group, element) == _SEQUENCE_DELIMITER:
            return pos
        if (group, element) != _ITEM or length == _UNDEFINED_LENGTH:
            raise DecodeError(
                "corrupt",
                f"{name}: encapsulated Pixel Data has a malformed item ({group:04X},{element:04X})",
            )
        pos += 8 + length
        if pos > size:
            raise DecodeError("truncated", f"{name}: encapsulated Pixel Data fragment is cut off")


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Codestream:
    """Frame 0 of encapsulated Pixel Data and what its own header declares."""

    frame: bytes
    rows: int
    cols: int
    components: int
    precision: int
    signed: bool


def _read_codestream(src: bytes, hdr: _Header, name: str) -> _Codestream | None:
    """Frame 0's JPEG / JPEG-LS / JPEG 2000 header, checked against the DICOM header.

    Decoders allocate what the codestream declares, not what the DICOM header
    says, so a small file whose codestream claims 60,000 x 60,000 pixels would
    pass the pixel limit and then ask the decoder for gigabytes (5.3 GB
    measured for a 30,000-pixel JPEG 2000 claim, before the decoder gave up).
    Both headers are parsed without decoding: pydicom's own JPEG parser
    (libjpeg's ``get_parameters`` allocates the whole image) and OpenJPEG's
    header reader. None for syntaxes without such a header (RLE).
    """
    ts = hdr.transfer_syntax
    if ts not in _JPEG_FAMILY and ts not in JPEG2000TransferSyntaxes:
        return None
    try:
        frame = get_frame(src, 0, number_of_frames=hdr.frames)
    except Exception:  # noqa: BLE001 - pydicom's item parser: any failure is a broken encapsulation
        raise DecodeError("corrupt", f"{name}: encapsulated Pixel Data holds no readable frame") from None
    if ts in _JPEG_FAMILY:
        info = _get_jpg_parameters(frame)
        if not info.get("height") or not info.get("width"):
            raise DecodeError("corrupt", f"{name}: the {ts.name} frame has no readable JPEG header")
        stream = _Codestream(frame, info["height"], info["width"], info["components"], info["precision"], False)
    else:
        try:
            info = get_parameters(frame)
        except Exception:  # noqa: BLE001 - OpenJPEG's header reader: RuntimeError, ValueError, ...
            raise DecodeError("corrupt", f"{name}: the {ts.name} frame has no readable JPEG 2000 header") from None
        stream = _Codestream(
            frame, info["rows"], info["columns"], info["samples_per_pixel"], info["precision"], info["is_signed"]
        )
    if (stream.rows, stream.cols) != (hdr.rows, hdr.cols) or stream.components not in (1, 3, 4):
        raise DecodeError(
            "corrupt",
            f"{name}: the {ts.name} frame declares {stream.cols}x{stream.rows} pixels and "
            f"{stream.components} component(s); the DICOM header says {hdr.cols}x{hdr.rows}",
        )
    return stream


def _decode_frame(
    src: bytes | memoryview,
    ds: Dataset,
    hdr: _Header,
    policy: DecodePolicy,
    name: str,
    target_size: int | None,
) -> np.ndarray:
    """Frame 0 as an integer array: (rows, cols) grey or (rows, cols, 3) RGB, maybe reduced in size."""
    stream = _read_codestream(src, hdr, name) if hdr.transfer_syntax.is_encapsulated else None
    if (
        stream is not None
        and hdr.transfer_syntax in (JPEGBaseline8Bit, JPEGExtended12Bit)
        and hdr.samples == 1
        and hdr.bits_allocated == 8
        and hdr.pixel_representation == 0
    ):
        pixels = _pillow_or_none(
            raster.decode_jpeg_grey, stream.frame, name, policy.max_pixels, target_size, (hdr.cols, hdr.rows)
        )
        if pixels is not None:
            return pixels
    if (
        stream is not None
        and target_size
        and hdr.transfer_syntax in (JPEG2000Lossless, JPEG2000)
        and hdr.samples == 1
        and hdr.pixel_representation == 0
        # pydicom reconciles a codestream that disagrees with the header; leave those to it
        and (stream.components, stream.precision, stream.signed) == (1, hdr.bits_stored, False)
    ):
        pixels = _pillow_or_none(
            raster.decode_j2k_grey,
            stream.frame, name, policy.max_pixels, target_size, (hdr.cols, hdr.rows), hdr.bits_stored,
        )
        if pixels is not None:
            return pixels
    try:
        options = as_pixel_options(ds)
        options["number_of_frames"] = hdr.frames
        options["pixel_keyword"] = "PixelData"
        # A zero-copy view only where no unused-bit correction is due (pydicom
        # would log a warning per file otherwise, and copy anyway).
        view_only = hdr.bits_stored == hdr.bits_allocated
        pixels, _ = get_decoder(hdr.transfer_syntax).as_array(
            src, index=0, view_only=view_only, as_rgb=True, **options
        )
    except Exception as exc:  # codec and plugin errors of every kind
        text = str(exc).lower()
        code = "truncated" if ("less than expected" in text or "truncat" in text) else "corrupt"
        raise DecodeError(
            code,
            f"{name}: pixel data could not be decoded ({hdr.transfer_syntax.name}, {type(exc).__name__})",
        ) from None
    expected = (hdr.rows, hdr.cols) if hdr.samples == 1 else (hdr.rows, hdr.cols, 3)
    if pixels.shape != expected:
        raise DecodeError(
            "corrupt", f"{name}: decoded shape {pixels.shape} does not match the header {expected}"
        )
    return pixels


def _pillow_or_none(decode, *args) -> np.ndarray | None:
    """A frame through one of Pillow's reduced-size decoders (JPEG DCT scaling, JPEG 2000
    resolution levels); None lets pydicom's decoder try it instead, whatever Pillow refused."""
    try:
        return decode(*args)
    except (DecodeError, ValueError, OSError):
        return None


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    if not isinstance(center, str | bytes) and hasattr(center, "__len__"):
        center = center[0]
    if not isinstance(width, str | bytes) and hasattr(width, "__len__"):
        width = width[0]
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    return float(center), float(width), function


def _apply_window(pixels: np.ndarray, center: float, width: float, function: str) -> bool:
    """PS3.3 C.11.2.1.2 windowing to [0, 1], in place. False when the width is invalid."""
    if not (math.isfinite(center) and math.isfinite(width)):
        return False
    if function == "SIGMOID":
        if width <= 0:
            return False
        pixels -= np.float32(center)
        pixels *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):
            np.exp(pixels, out=pixels)
        pixels += np.float32(1.0)
        np.reciprocal(pixels, out=pixels)
        return True
    if function == "LINEAR_EXACT":
        if width <= 0:
            return False
        pixels -= np.float32(center)
        pixels *= np.float32(1.0 / width)
    else:  # LINEAR (the default, and what an unknown function falls back to)
        if width < 1:
            return False
        if width == 1:  # degenerate: a threshold at center - 0.5
            np.greater(pixels, np.float32(center - 0.5), out=pixels, casting="unsafe")
            return True
        pixels -= np.float32(center - 0.5)
        pixels *= np.float32(1.0 / (width - 1.0))
    pixels += np.float32(0.5)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return True


def _min_max(pixels: np.ndarray, notes: list[str]) -> None:
    low, high = float(pixels.min()), float(pixels.max())
    if high > low:
        pixels -= np.float32(low)
        pixels *= np.float32(1.0 / (high - low))
    else:
        notes.append("image is constant")
        pixels.fill(0.0)


def _lut(
    ds: Dataset, keyword: str, little_endian: bool, signed: bool
) -> tuple[int, np.ndarray] | None:
    """(first mapped value, LUT entries as float32) of a Modality / VOI LUT Sequence item.

    Parsed here rather than with pydicom's ``apply_modality_lut`` because pydicom
    builds a ``uint<bits>`` dtype from the descriptor and so fails on the common
    12-bit LUTs (``uint12``).
    """
    sequence = ds.get(keyword)
    if not sequence:
        return None
    item = sequence[0]
    descriptor, element = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or element is None or item["LUTData"].is_empty:
        return None
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    if signed and first >= 32768:  # first value written as US although pixels are signed
        first -= 65536
    data = item["LUTData"]
    if isinstance(data.value, bytes | bytearray):
        values = np.frombuffer(data.value, dtype="<u2" if little_endian else ">u2")
    else:
        values = np.asarray(data.value if data.VM > 1 else [data.value], dtype=np.int64)
    if values.size < entries:
        raise ValueError(f"{keyword} has {values.size} entries, its descriptor says {entries}")
    return first, values[:entries].astype(np.float32)


def _apply_lut(pixels: np.ndarray, first: int, lut: np.ndarray) -> np.ndarray:
    """LUT lookup: values below ``first`` take entry 0, above the table the last entry."""
    index = pixels.astype(np.int64) - first
    np.clip(index, 0, lut.size - 1, out=index)
    return lut[index]


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return None
    slope, intercept = float(slope), float(intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ValueError("rescale slope/intercept are not usable numbers")
    if slope == 1.0 and intercept == 0.0:
        return None
    return slope, intercept


def _grey_to_unit(
    pixels: np.ndarray, ds: Dataset, hdr: _Header, target_size: int | None, notes: list[str]
) -> np.ndarray:
    """Stored values -> modality LUT / rescale -> VOI LUT / window -> [0, 1] float32."""
    signed = hdr.pixel_representation == 1
    modality_lut = _lut(ds, "ModalityLUTSequence", hdr.little_endian, signed)
    voi_lut = _lut(ds, "VOILUTSequence", hdr.little_endian, signed)
    rescale = None if modality_lut else _rescale(ds)
    if modality_lut is None and voi_lut is None:
        # The common path: one full-size float copy, reduced, then in-place arithmetic.
        out = raster.reduce_float(pixels.astype(np.float32), target_size)
        if rescale is not None:
            out *= np.float32(rescale[0])
            out += np.float32(rescale[1])
        window = _window(ds)
        if window is not None and not _apply_window(out, *window):
            notes.append(f"window width {window[1]} invalid for {window[2]}; used min-max")
            window = None
        if window is None:
            _min_max(out, notes)
        return out
    # LUT path (rare): tables index integer values, so it runs at full size.
    if modality_lut is not None:
        values = _apply_lut(pixels, *modality_lut)
    elif rescale is not None:
        values = pixels.astype(np.float32) * np.float32(rescale[0]) + np.float32(rescale[1])
    else:
        values = pixels
    if voi_lut is None:
        out = values.astype(np.float32)
        window = _window(ds)
        if window is not None and not _apply_window(out, *window):
            notes.append(f"window width {window[1]} invalid for {window[2]}; used min-max")
            window = None
        if window is None:
            _min_max(out, notes)
        return raster.reduce_float(out, target_size)
    first, lut = voi_lut
    out = _apply_lut(np.rint(values) if values.dtype.kind == "f" else values, first, lut)
    low, high = float(lut.min()), float(lut.max())  # the table's own output range
    if high > low:
        out -= np.float32(low)
        out *= np.float32(1.0 / (high - low))
    else:
        notes.append("VOI LUT is constant")
        out.fill(0.0)
    return raster.reduce_float(out, target_size)


def _colour_to_unit(pixels: np.ndarray, hdr: _Header, target_size: int | None) -> np.ndarray:
    grey = pixels @ _LUMA  # (H, W, 3) uint -> (H, W) float32
    grey = raster.reduce_float(np.ascontiguousarray(grey, dtype=np.float32), target_size)
    grey *= np.float32(1.0 / (2**hdr.bits_stored - 1))
    return grey


# ---------------------------------------------------------------- entry point


def decode_dicom(
    data: bytes,
    name: str,
    *,
    policy: DecodePolicy,
    pseudonym_key: bytes | None = None,
    target_size: int | None = None,
    preamble: bool = True,
) -> DecodedImage:
    """Decode a DICOM file (``preamble`` False for a bare dataset) to grey float32 in [0, 1]."""
    ds, pixel_pos = _read_header(data, name, preamble, policy.max_header_bytes)
    recognisable = _recognisable(ds)
    header_cut = _header_truncated(ds, len(data), preamble, recognisable)
    if not preamble and "SOPClassUID" not in ds and not ("Rows" in ds and "Columns" in ds):
        raise DecodeError(
            "not_an_image", f"{name}: not a DICOM file (no DICM marker, no image attributes)"
        )
    if not recognisable:
        if header_cut:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside its header")
        raise DecodeError("corrupt", f"{name}: DICM marker but no recognisable DICOM header")
    hdr = _parse_header(ds, name)
    _check_object(hdr, policy, name)
    # Presence and extent of Pixel Data are known without reading them: report a
    # missing or cut-off Pixel Data before the image attributes it would need.
    if len(data) - pixel_pos < 8:
        _pixel_source(data, pixel_pos, hdr, name, header_cut)  # raises no_pixel_data / truncated
    _check_image(hdr, policy, name)
    src = _pixel_source(data, pixel_pos, hdr, name, header_cut)
    pixels = _decode_frame(src, ds, hdr, policy, name, target_size)
    try:
        if hdr.samples == 3:
            unit = _colour_to_unit(pixels, hdr, target_size)
        else:
            unit = _grey_to_unit(pixels, ds, hdr, target_size, hdr.warnings)
            if hdr.photometric == "MONOCHROME1":
                np.subtract(np.float32(1.0), unit, out=unit)
    except DecodeError:
        raise
    except Exception as exc:  # malformed LUT / window / rescale attributes
        raise DecodeError(
            "corrupt",
            f"{name}: modality/VOI attributes could not be applied ({type(exc).__name__})",
        ) from None
    np.clip(unit, 0.0, 1.0, out=unit)
    meta = ImageMetadata(
        format="dicom",
        rows=hdr.rows,
        cols=hdr.cols,
        modality=hdr.modality,
        view_position=hdr.view,
        photometric_interpretation=hdr.photometric,
        bits_stored=hdr.bits_stored,
        frames=hdr.frames,
        sop_class_uid=hdr.sop_class,
        transfer_syntax_uid=str(hdr.transfer_syntax),
        warnings=tuple(hdr.warnings),
        **_pseudonyms(ds, pseudonym_key),
    )
    return DecodedImage(pixels=unit, meta=meta)


def _identifier(ds: Dataset | None, keyword: str) -> str | None:
    """An identifier's text straight from its raw bytes.

    Letting pydicom convert it would validate it, and a malformed value (an
    over-long PatientID, a UID with letters) comes back as a warning *quoting
    the value*, which then lands in every log. The bytes are UTF-8 or, failing
    that, Latin-1 (ISO_IR 100), the two character sets archives actually use.
    """
    if ds is None or keyword not in ds:
        return None
    value = ds.get_item(keyword).value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin-1")
    return None if value is None else str(value)


def _pseudonyms(ds: Dataset, key: bytes | None) -> dict[str, str | None]:
    if key is None:
        return {}
    meta = getattr(ds, "file_meta", None)
    instance = _identifier(ds, "SOPInstanceUID") or _identifier(meta, "MediaStorageSOPInstanceUID")
    return {
        "patient_pseudonym": pseudonym_or_none(_identifier(ds, "PatientID"), key),
        "study_pseudonym": pseudonym_or_none(_identifier(ds, "StudyInstanceUID"), key),
        "instance_pseudonym": pseudonym_or_none(instance, key),
    }
