"""Value types produced by decoding: pixels plus metadata that carries no PHI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

FRONTAL_VIEWS = frozenset({"PA", "AP"})


@dataclass(frozen=True)
class DecodePolicy:
    """What the decoder accepts. Defaults suit frontal chest radiographs."""

    # rows * cols * frames, checked from the header before any pixel decoding.
    max_pixels: int = 64_000_000
    # DICOM bytes before Pixel Data. Real radiograph headers take kilobytes (a few MB with
    # overlays or vendor blobs); parsing costs 0.3-0.5 KB of memory per element, so a file of
    # hundreds of MB of tiny elements would need tens of GB. Only this much is ever parsed.
    max_header_bytes: int = 16 * 1024 * 1024
    # Modalities of projection radiography; CT/MR/US... are refused.
    allowed_modalities: frozenset[str] = frozenset({"CR", "DX", "DR", "OT", "RG", "PX"})
    reject_lateral: bool = True
    # "error": refuse multi-frame objects; "first": screen frame 0 with a warning.
    multi_frame: str = "error"
    # Seconds one input may spend decoding before it is abandoned as ``timeout`` (None: no limit).
    # Real radiographs take 5-250 ms here; a decoder still busy after this is hung or spinning.
    max_decode_seconds: float | None = 10.0


@dataclass(frozen=True)
class ImageMetadata:
    """Everything the outputs may say about one image. Identifiers only as pseudonyms."""

    format: str  # "dicom" | "png" | "jpeg"
    rows: int
    cols: int
    modality: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    manufacturer: str | None = None  # (0008,0070): equipment, never patient data
    bits_stored: int | None = None
    frames: int = 1
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    # HMAC-SHA256 pseudonyms (hex); None when no key was supplied or the tag is absent.
    patient_pseudonym: str | None = None
    study_pseudonym: str | None = None
    instance_pseudonym: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class DecodedImage:
    """A decoded radiograph: float32 (H, W) in [0, 1], 1.0 = most attenuating (bone white)."""

    pixels: np.ndarray
    meta: ImageMetadata
