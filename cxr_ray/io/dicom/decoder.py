"""``decode_dicom``: header, checks, pixel extent, frame, values, in that order (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from cxr_ray.errors import DecodeError
from cxr_ray.io.dicom.header import (
    Header,
    check_image,
    check_object,
    header_truncated,
    is_recognisable,
    parse_header,
    read_header,
)
from cxr_ray.io.dicom.pixels import decode_frame, pixel_source
from cxr_ray.io.dicom.values import colour_to_unit, grey_to_unit
from cxr_ray.io.pseudonym import pseudonym_or_none
from cxr_ray.io.types import DecodedImage, DecodePolicy, ImageMetadata


@dataclass(frozen=True)
class CheckedDicom:
    """A DICOM file that passed every header guard: its dataset, header and complete Pixel Data.

    What :func:`check_dicom` returns and both decoders (pydicom's plugins here, nvImageCodec in
    :mod:`cxr_ray.io.gpu`) start from, so no decoder of either path sees a file the guards refuse.
    """

    ds: Dataset
    hdr: Header
    src: bytes | memoryview


def check_dicom(data: bytes, name: str, *, policy: DecodePolicy, preamble: bool = True) -> CheckedDicom:
    """Parse the header and run every check before decoding; :class:`DecodeError` on refusal."""
    ds, pixel_pos = read_header(data, name, preamble, policy.max_header_bytes)
    recognisable = is_recognisable(ds)
    header_cut = header_truncated(ds, len(data), preamble, recognisable)
    if not preamble and "SOPClassUID" not in ds and not ("Rows" in ds and "Columns" in ds):
        raise DecodeError(
            "not_an_image", f"{name}: not a DICOM file (no DICM marker, no image attributes)"
        )
    if not recognisable:
        if header_cut:
            raise DecodeError("truncated", f"{name}: DICOM file ends inside its header")
        raise DecodeError("corrupt", f"{name}: DICM marker but no recognisable DICOM header")
    hdr = parse_header(ds, name)
    check_object(hdr, policy, name)
    # Presence and extent of Pixel Data are known without reading them: report a
    # missing or cut-off Pixel Data before the image attributes it would need.
    if len(data) - pixel_pos < 8:
        pixel_source(data, pixel_pos, hdr, name, header_cut)  # raises no_pixel_data / truncated
    check_image(hdr, policy, name)
    return CheckedDicom(ds, hdr, pixel_source(data, pixel_pos, hdr, name, header_cut))


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
    checked = check_dicom(data, name, policy=policy, preamble=preamble)
    ds, hdr = checked.ds, checked.hdr
    pixels = decode_frame(checked.src, ds, hdr, policy, name, target_size)
    try:
        if hdr.samples == 3:
            unit = colour_to_unit(pixels, hdr, target_size)
        else:
            unit = grey_to_unit(pixels, ds, hdr, target_size, hdr.warnings)
            if hdr.photometric == "MONOCHROME1":
                np.subtract(np.float32(1.0), unit, out=unit)
    except DecodeError:
        raise
    except Exception as exc:  # malformed LUT / window / rescale attributes
        raise values_error(name, exc) from None
    np.clip(unit, 0.0, 1.0, out=unit)
    return DecodedImage(pixels=unit, meta=dicom_metadata(ds, hdr, pseudonym_key))


def values_error(name: str, exc: BaseException) -> DecodeError:
    """Malformed LUT / window / rescale attributes, as the one ``corrupt`` error both decoders give."""
    return DecodeError(
        "corrupt", f"{name}: modality/VOI attributes could not be applied ({type(exc).__name__})"
    )


def dicom_metadata(ds: Dataset, hdr: Header, pseudonym_key: bytes | None) -> ImageMetadata:
    """What outputs may say about a decoded DICOM image (identifiers only as keyed pseudonyms)."""
    return ImageMetadata(
        format="dicom",
        rows=hdr.rows,
        cols=hdr.cols,
        modality=hdr.modality,
        view_position=hdr.view,
        photometric_interpretation=hdr.photometric,
        manufacturer=hdr.manufacturer,
        bits_stored=hdr.bits_stored,
        frames=hdr.frames,
        sop_class_uid=hdr.sop_class,
        transfer_syntax_uid=str(hdr.transfer_syntax),
        warnings=tuple(hdr.warnings),
        **_pseudonyms(ds, pseudonym_key),
    )


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
