"""What DICOM bytes look like: the accepted SOP classes and views, tag and VR constants, and recognition by content."""

from __future__ import annotations

import struct

from pydicom.uid import JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

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

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009})
ANY_PIXEL_DATA = FLOAT_PIXEL_DATA | {PIXEL_DATA}
ITEM = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ALL_VRS = LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
JPEG_FAMILY = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)


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
    if data[4:6] in ALL_VRS:
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length % 2 == 0 and length <= min(1024, len(data) - 8)
