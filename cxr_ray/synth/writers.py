"""Encode phantoms the way real archives hold radiographs: DICOM, PNG, JPEG, and broken files.

DICOM objects vary like a PACS export does: CR and DX SOP classes,
MONOCHROME1 (stored values inverted) and MONOCHROME2, BitsStored 12/14/16,
optional Rescale Slope/Intercept, optional Window Center/Width, implicit and
explicit VR, RLE Lossless (pylibjpeg-rle, else pydicom's own encoder) and JPEG 2000 Lossless
(pylibjpeg-openjpeg; RLE stands in when that encoder is missing). UIDs are
derived from the seed, and no date/time tag depends on the clock, so one seed
gives byte-identical files.

Every encoder takes the phantom as float32 in [0, 1] with 1.0 = bone white,
which is what :func:`cxr_ray.io.decode.decode_image` gives back.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_PREFIX = "2.25."  # UUID-derived UIDs: no registered root needed
_DETECTOR_MM = 430.0  # a 43 cm detector


@dataclass(frozen=True)
class DicomIdentity:
    """Synthetic identifiers of one image (nothing here is real patient data)."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    accession: str
    uid_key: str  # unique per image and seed: UIDs are hashed from it

    def uid(self, what: str) -> str:
        """A ``2.25.<128-bit int>`` UID hashed from the key (pydicom's prefix=None is random)."""
        digest = hashlib.sha256(f"{self.uid_key}/{what}".encode()).digest()[:16]
        return _UID_PREFIX + str(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class DicomOptions:
    modality: str  # "CR" | "DX"
    photometric: str  # "MONOCHROME1" | "MONOCHROME2"
    bits_stored: int
    rescale: tuple[float, float] | None  # (slope, intercept)
    window: bool
    transfer_syntax: str  # "explicit" | "implicit" | "rle" | "j2k"

    def describe(self) -> str:
        rescale = f"rescale{self.rescale[0]:g}/{self.rescale[1]:g}" if self.rescale else "norescale"
        window = "window" if self.window else "nowindow"
        return f"{self.modality}/{self.photometric}/{self.bits_stored}bit/{rescale}/{window}/{self.transfer_syntax}"


@lru_cache(maxsize=1)
def jpeg2000_available() -> bool:
    """Whether pydicom can encode JPEG 2000 Lossless here (needs pylibjpeg-openjpeg)."""
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(JPEG2000Lossless).is_available)
    except Exception:
        return False


@lru_cache(maxsize=1)
def _rle_plugin() -> str:
    """pylibjpeg-rle (compiled) when installed; pydicom's own pure-Python encoder otherwise."""
    try:
        from pydicom.pixels import get_encoder

        return "pylibjpeg" if "pylibjpeg" in get_encoder(RLELossless).available_plugins else "pydicom"
    except Exception:
        return "pydicom"


def sample_dicom_options(rng: np.random.Generator) -> DicomOptions:
    syntaxes = ["explicit", "implicit", "rle", "j2k"]
    syntax = syntaxes[int(rng.choice(4, p=[0.4, 0.15, 0.25, 0.2]))]
    if syntax == "j2k" and not jpeg2000_available():
        syntax = "rle"
    roll = rng.random()
    rescale = None if roll < 0.6 else (1.0, 0.0) if roll < 0.8 else (0.5, 100.0)
    return DicomOptions(
        modality="CR" if rng.random() < 0.5 else "DX",
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
        bits_stored=int(rng.choice([12, 14, 16])),
        rescale=rescale,
        window=bool(rng.random() < 0.75),
        transfer_syntax=syntax,
    )


def _base_dataset(identity: DicomIdentity, sop_class: str, modality: str, syntax_uid: str) -> Dataset:
    sop_instance = identity.uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class  # type: ignore[assignment]
    meta.MediaStorageSOPInstanceUID = sop_instance  # type: ignore[assignment]
    meta.TransferSyntaxUID = syntax_uid  # type: ignore[assignment]
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = identity.study_date
    ds.AccessionNumber = identity.accession
    ds.Modality = modality
    ds.Manufacturer = "cxr-ray phantom"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = identity.uid("study")
    ds.SeriesInstanceUID = identity.uid("series")
    ds.StudyID = identity.accession[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, photometric: str, signed: bool = False) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(x) for x in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2" if signed else "<u2").tobytes()


def _encode(ds: Dataset, syntax: str) -> bytes:
    if syntax == "rle":
        ds.compress(RLELossless, encoding_plugin=_rle_plugin(), generate_instance_uid=False)
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ds(value: float) -> str:
    """A Decimal String value that fits in 16 characters."""
    return f"{value:.6g}"


def encode_dicom(image: np.ndarray, identity: DicomIdentity, options: DicomOptions, view: str) -> bytes:
    """A frontal chest radiograph as a DICOM Part 10 file."""
    sop = CR_IMAGE_STORAGE if options.modality == "CR" else DX_PRESENTATION_STORAGE
    syntax_uid = ImplicitVRLittleEndian if options.transfer_syntax == "implicit" else ExplicitVRLittleEndian
    ds = _base_dataset(identity, sop, options.modality, syntax_uid)
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["R", "F"]
    if options.modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [_ds(_DETECTOR_MM / image.shape[0])] * 2
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PixelSpacing = [_ds(_DETECTOR_MM / image.shape[0])] * 2

    top = (1 << options.bits_stored) - 1
    values = np.rint(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    stored = (top - values) if options.photometric == "MONOCHROME1" else values
    _set_pixels(ds, stored, options.bits_stored, options.photometric)
    slope, intercept = options.rescale or (1.0, 0.0)
    if options.rescale is not None:
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleType = "US"
    if options.window:
        lo, hi = np.percentile(stored[:: 4, :: 4], [0.5, 99.8]).tolist()
        lo, hi = lo * slope + intercept, hi * slope + intercept
        ds.WindowCenter = _ds((lo + hi) / 2.0)
        ds.WindowWidth = _ds(max(hi - lo, 1.0))
    return _encode(ds, options.transfer_syntax)


def encode_dicom_frame(image: np.ndarray, identity: DicomIdentity, codestream: bytes, syntax_uid: str,
                       bits_stored: int) -> bytes:
    """A frontal DX radiograph whose one frame is an already encoded ``codestream`` (JPEG Baseline,
    HTJ2K, ... written by another encoder), encapsulated under ``syntax_uid``, MONOCHROME2."""
    ds = _base_dataset(identity, DX_PRESENTATION_STORAGE, "DX", syntax_uid)
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(x) for x in image.shape[:2])
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def encode_jpeg_dicom(image: np.ndarray, identity: DicomIdentity, quality: int = 92) -> bytes:
    """A frontal DX radiograph in JPEG Baseline (Process 1), 8-bit grey, as CR/DX archives keep them."""
    return encode_dicom_frame(image, identity, encode_jpeg(image, rgb=False, quality=quality), JPEGBaseline8Bit, 8)


def encode_lateral_dicom(image: np.ndarray, identity: DicomIdentity) -> bytes:
    """A left-lateral DX view (screening refuses it: ``lateral_view``)."""
    ds = _base_dataset(identity, DX_PRESENTATION_STORAGE, "DX", ExplicitVRLittleEndian)
    ds.ViewPosition = "LL"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    _set_pixels(ds, np.rint(image * 4095).astype(np.uint16), 12, "MONOCHROME2")
    return _encode(ds, "explicit")


def encode_ct_dicom(hounsfield: np.ndarray, identity: DicomIdentity) -> bytes:
    """An axial CT slice (screening refuses it: ``unsupported_modality``)."""
    ds = _base_dataset(identity, CT_IMAGE_STORAGE, "CT", ExplicitVRLittleEndian)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.ImagePositionPatient = ["-200", "-200", "-150"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(400.0 / hounsfield.shape[0])] * 2
    _set_pixels(ds, hounsfield.astype(np.int16), 16, "MONOCHROME2", signed=True)
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return _encode(ds, "explicit")


def truncate(data: bytes, rng: np.random.Generator, pixel_bytes: int) -> bytes:
    """Cut a file somewhere inside its last ``pixel_bytes`` (the pixel data)."""
    keep = int(pixel_bytes * rng.uniform(0.2, 0.8))
    return data[: len(data) - pixel_bytes + keep]


def encode_png(image: np.ndarray, kind: str) -> bytes:
    """``kind``: ``"gray8"``, ``"gray16"`` or ``"rgb8"``."""
    clipped = np.clip(image, 0.0, 1.0)
    if kind == "gray16":
        pil = Image.fromarray(np.rint(clipped * 65535).astype(np.uint16))
    else:
        gray = np.rint(clipped * 255).astype(np.uint8)
        pil = Image.fromarray(np.stack([gray] * 3, axis=-1) if kind == "rgb8" else gray)
    out = io.BytesIO()
    pil.save(out, format="PNG", compress_level=4)
    return out.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def encode_jpeg(image: np.ndarray, rgb: bool, quality: int) -> bytes:
    gray = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    pil = Image.fromarray(np.stack([gray] * 3, axis=-1) if rgb else gray)
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=int(quality))
    return out.getvalue()


def random_bytes(rng: np.random.Generator) -> bytes:
    """Noise that no sniffer mistakes for DICOM, PNG or JPEG."""
    data = bytearray(rng.bytes(int(rng.integers(600, 16_384))))
    data[0:4] = b"\x00\x00\x00\x00"  # not a DICOM group, not a PNG/JPEG signature
    data[128:132] = b"\x00\x00\x00\x00"  # no DICM marker
    return bytes(data)


NOT_AN_IMAGE_TEXT = (
    b"This file is a placeholder, not an image.\n"
    b"It was exported by a misconfigured script and named like a PNG.\n"
)

__all__ = [
    "DicomIdentity",
    "DicomOptions",
    "encode_ct_dicom",
    "encode_dicom",
    "encode_dicom_frame",
    "encode_jpeg_dicom",
    "encode_jpeg",
    "encode_lateral_dicom",
    "encode_mask",
    "encode_png",
    "jpeg2000_available",
    "random_bytes",
    "sample_dicom_options",
    "truncate",
]
