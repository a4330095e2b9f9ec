"""``decode_dicom``: header, checks, pixel extent, frame, values, in that order (see the package docstring)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from cxr_ray.errors import DecodeError
from cxr_ray.io.dicom.header import (
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
    src = pixel_source(data, pixel_pos, hdr, name, header_cut)
    pixels = decode_frame(src, ds, hdr, policy, name, target_size)
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
