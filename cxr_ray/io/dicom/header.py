"""The DICOM header: parsed without pixels, then checked (is this a frontal radiograph we can decode?)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cxr_ray.errors import DecodeError
from cxr_ray.io.dicom.tags import (
    ALLOWED_SOP_CLASSES,
    ANY_PIXEL_DATA,
    COLOUR_PHOTOMETRICS,
    GREY_PHOTOMETRICS,
    LATERAL_VIEWS,
    UNDEFINED_LENGTH,
)
from cxr_ray.io.types import FRONTAL_VIEWS, DecodePolicy


@dataclass
class Header:
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
    manufacturer: str | None = None  # equipment, not patient data: the drift check's header mix


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


def read_header(data: bytes, name: str, preamble: bool, max_header_bytes: int) -> tuple[Dataset, int]:
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
    return (group << 16 | element) in ANY_PIXEL_DATA


def _declares_deflate(data: bytes) -> bool:
    # File Meta group length sits at 140..144 when (0002,0000) is the first meta element.
    end = 2048
    if data[132:138] == b"\x02\x00\x00\x00UL" and len(data) >= 144:
        end = 144 + struct.unpack_from("<I", data, 140)[0]
    return DeflatedExplicitVRLittleEndian.encode() in data[132 : min(end, 4096)]


def is_recognisable(ds: Dataset) -> bool:
    """Parsed into something a DICOM writer produced (not noise behind a DICM marker)."""
    meta = getattr(ds, "file_meta", None)
    return any(keyword in ds for keyword in ("SOPClassUID", "Rows", "Modality")) or bool(
        meta is not None and meta.get("MediaStorageSOPClassUID")
    )


def header_truncated(ds: Dataset, data_len: int, preamble: bool, recognisable: bool) -> bool:
    """True when the file visibly ends inside the header (pydicom reads short values silently)."""
    meta = getattr(ds, "file_meta", None)
    meta_len = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    # A real File Meta group is a few hundred bytes; noise "claims" gigabytes.
    if preamble and isinstance(meta_len, int) and meta_len < 65536 and 144 + meta_len > data_len:
        return True
    if not recognisable or not len(ds):
        return False
    raw = ds.get_item(next(reversed(ds.keys())))  # type: ignore[call-overload]
    return (
        isinstance(raw, RawDataElement)
        and raw.length != UNDEFINED_LENGTH
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


def parse_header(ds: Dataset, name: str) -> Header:
    try:
        ts, implicit, little = _transfer_syntax(ds)
        sop = _text(ds, "SOPClassUID")
        if sop is None and hasattr(ds, "file_meta"):
            sop = _text(ds.file_meta, "MediaStorageSOPClassUID")
        frames = _int(ds, "NumberOfFrames", 1) or 1
        return Header(
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
            manufacturer=_text(ds, "Manufacturer"),
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(
            "corrupt",
            f"{name}: DICOM header has an unreadable image attribute ({type(exc).__name__})",
        ) from None


def check_object(hdr: Header, policy: DecodePolicy, name: str) -> None:
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


def check_image(hdr: Header, policy: DecodePolicy, name: str) -> None:
    """Dimensions, frame count, pixel count, decoder availability and photometric."""
    _check_geometry(hdr, policy, name)
    _check_transfer_syntax(hdr, name)
    _check_photometric(hdr, name)


def _check_geometry(hdr: Header, policy: DecodePolicy, name: str) -> None:
    """Rows, columns, samples, bits, frames, and the pixel count the policy allows."""
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


def _check_transfer_syntax(hdr: Header, name: str) -> None:
    """A transfer syntax with an installed pixel decoder (never deflated)."""
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


def _check_photometric(hdr: Header, name: str) -> None:
    """Grey or a colour model converted to luminance; samples consistent with it."""
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
