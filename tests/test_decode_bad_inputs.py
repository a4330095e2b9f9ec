"""The bad-input catalogue: each malformed or out-of-scope file gets its stable code,
quickly, without a large allocation, and with a message that names the file and
carries no patient data."""

from __future__ import annotations

import io
import resource
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from test_decode_dicom import (
    PATIENT_ID,
    PATIENT_NAME,
    SECONDARY_CAPTURE,
    make_dataset,
    make_dicom,
    ramp,
    to_bytes,
)

from cxr_ray.errors import DECODE_ERROR_CODES, DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.types import DecodePolicy

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GREYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MPEG2 = "1.2.840.10008.1.2.4.100"
# Any single case may allocate at most this much (numpy and Python objects; tracemalloc).
MAX_PEAK_BYTES = 16 << 20


# ------------------------------------------------------------------ builders


def png_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, **kwargs).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def noise(shape=(256, 256), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of valid PNG whose header claims width x height (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # four rows of zeros; the rest is never read
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(jpeg_bytes(noise((16, 16))))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def dicom_claiming(rows: int, cols: int, payload: bytes) -> bytes:
    ds = make_dataset(with_pixels=False, bits_stored=16)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = payload
    return to_bytes(ds)


def deflated_dicom() -> bytes:
    ds = make_dataset(bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return to_bytes(ds)


def mpeg2_dicom() -> bytes:
    ds = make_dataset(ramp(16, 16, bits=8, dtype=np.uint8), with_pixels=False)
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def rle_dicom() -> bytes:
    ds = make_dataset(ramp(128, 128), bits_stored=12)
    ds.compress(RLELossless)
    return to_bytes(ds)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def cut_in_header(data: bytes) -> bytes:
    """Cut a DICOM file inside the value of its StudyInstanceUID."""
    return data[: data.index(b"1.2.826.0.1.3680043") + 10]


CATALOGUE = {
    # case id: (builder, file name, expected code)
    "empty file": (lambda: b"", "empty.dcm", "empty"),
    "random bytes": (lambda: np.random.default_rng(7).bytes(4096), "random.bin", "not_an_image"),
    "text named .png": (lambda: b"patient list\n" * 40, "notes.png", "not_an_image"),
    "tiff": (lambda: b"II*\x00" + bytes(200), "scan.tif", "not_an_image"),
    "truncated dicom (pixel data)": (
        lambda: cut(make_dicom(ramp(128, 128)), 0.6),
        "cut.dcm",
        "truncated",
    ),
    "truncated dicom (header)": (
        lambda: cut_in_header(make_dicom()),
        "cut-header.dcm",
        "truncated",
    ),
    "truncated dicom (file meta)": (lambda: make_dicom()[:150], "cut-meta.dcm", "truncated"),
    "truncated rle dicom": (lambda: cut(rle_dicom(), 0.7), "cut-rle.dcm", "truncated"),
    "truncated png": (lambda: cut(png_bytes(noise()), 0.5), "cut.png", "truncated"),
    "png cut in its header": (lambda: png_bytes(noise())[:20], "head.png", "truncated"),
    "truncated jpeg": (lambda: cut(jpeg_bytes(noise()), 0.5), "cut.jpg", "truncated"),
    "dicom without pixel data": (
        lambda: make_dicom(with_pixels=False),
        "nopix.dcm",
        "no_pixel_data",
    ),
    "structured report": (
        lambda: make_dicom(sop_class=BASIC_TEXT_SR, modality="SR", view=None, with_pixels=False),
        "report.dcm",
        "unsupported_sop_class",
    ),
    "presentation state": (
        lambda: make_dicom(
            sop_class=GREYSCALE_PRESENTATION_STATE, modality="PR", view=None, with_pixels=False
        ),
        "gsps.dcm",
        "unsupported_sop_class",
    ),
    "ct image": (
        lambda: make_dicom(sop_class=CT_IMAGE, modality="CT", view=None),
        "ct.dcm",
        "unsupported_modality",
    ),
    "mr image": (
        lambda: make_dicom(sop_class=MR_IMAGE, modality="MR", view=None),
        "mr.dcm",
        "unsupported_modality",
    ),
    "ct modality in a secondary capture": (
        lambda: make_dicom(sop_class=SECONDARY_CAPTURE, modality="CT"),
        "sc-ct.dcm",
        "unsupported_modality",
    ),
    "lateral LL": (lambda: make_dicom(view="LL"), "ll.dcm", "lateral_view"),
    "lateral RL": (lambda: make_dicom(view="RL"), "rl.dcm", "lateral_view"),
    "lateral LATERAL": (lambda: make_dicom(view="LATERAL"), "lat.dcm", "lateral_view"),
    "multi-frame": (
        lambda: make_dicom(
            np.stack([ramp()] * 3), sop_class="1.2.840.10008.5.1.4.1.1.7.3", modality="OT"
        ),
        "cine.dcm",
        "multi_frame",
    ),
    "palette colour": (
        lambda: make_dicom(photometric="PALETTE COLOR"),
        "pal.dcm",
        "unsupported_photometric",
    ),
    "YBR_PARTIAL_420": (
        lambda: make_dicom(np.zeros((8, 8, 3), np.uint8), photometric="YBR_PARTIAL_420"),
        "ybr.dcm",
        "unsupported_photometric",
    ),
    "header claims 65535x65535": (
        lambda: dicom_claiming(65535, 65535, b"\x00" * 64),
        "huge.dcm",
        "too_large",
    ),
    "pixel data shorter than the header": (
        lambda: dicom_claiming(512, 512, b"\x00" * 1000),
        "short.dcm",
        "truncated",
    ),
    "png bomb beyond Pillow's hard limit": (
        lambda: png_claiming(100_000, 100_000),
        "bomb.png",
        "too_large",
    ),
    "png bomb in Pillow's warning band": (
        lambda: png_claiming(10_000, 10_000),
        "bomb2.png",
        "too_large",
    ),
    "png above the policy limit": (lambda: png_claiming(9_000, 9_000), "bomb3.png", "too_large"),
    "jpeg bomb": (lambda: jpeg_claiming(60_000, 60_000), "bomb.jpg", "too_large"),
    "deflated dicom": (deflated_dicom, "deflate.dcm", "unsupported_transfer_syntax"),
    "video transfer syntax": (mpeg2_dicom, "video.dcm", "unsupported_transfer_syntax"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue(case):
    builder, name, code = CATALOGUE[case]
    data = builder()
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode_image(data, name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = info.value
    assert error.code == code, f"{case}: {error.code}: {error.message}"
    assert error.code in DECODE_ERROR_CODES
    assert name in error.message
    for secret in (PATIENT_ID, PATIENT_NAME, "Doe"):
        assert secret not in error.message
    assert peak < MAX_PEAK_BYTES, f"{case}: peak allocation {peak} bytes"


def test_random_bytes_are_never_taken_for_an_image():
    rng = np.random.default_rng(2024)
    for length in [1, 3, 8, 16, 131, 132, 200, 1000, 5000] * 20:
        with pytest.raises(DecodeError) as info:
            decode_image(rng.bytes(length), "random")
        assert info.value.code == "not_an_image"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom comments on the noise it parses
def test_random_bytes_behind_a_dicom_preamble_are_corrupt():
    rng = np.random.default_rng(5)
    for _ in range(50):
        data = bytes(128) + b"DICM" + rng.bytes(int(rng.integers(0, 3000)))
        with pytest.raises(DecodeError) as info:
            decode_image(data, "garbage.dcm")
        assert info.value.code == "corrupt"


def test_png_named_dcm_decodes_as_png():
    pixels = noise((32, 48))
    image = decode_image(png_bytes(pixels), "IMG0001.dcm")
    assert image.meta.format == "png"
    np.testing.assert_allclose(image.pixels, pixels / 255.0, atol=1e-6)


def test_dicom_without_extension_decodes_as_dicom():
    image = decode_image(make_dicom(), "IM000017")
    assert image.meta.format == "dicom"


def test_rgb_dicom_is_accepted_as_grey_with_a_warning():
    rgb = noise((16, 16, 3))
    image = decode_image(
        make_dicom(rgb, photometric="RGB", sop_class=SECONDARY_CAPTURE, modality="OT"), "rgb.dcm"
    )
    assert image.pixels.shape == (16, 16)
    assert any("converted to grey" in w for w in image.meta.warnings)


def test_decode_error_survives_pickling():
    """Ray ships task errors between processes; deepcopy goes through the same __reduce__."""
    import copy

    with pytest.raises(DecodeError) as info:
        decode_image(b"", "x")
    again = copy.deepcopy(info.value)
    assert (again.code, again.message) == (info.value.code, info.value.message)


def test_policy_can_tighten_the_raster_limit():
    with pytest.raises(DecodeError) as info:
        decode_image(png_bytes(noise((64, 64))), "small.png", policy=DecodePolicy(max_pixels=1000))
    assert info.value.code == "too_large"


def _j2k_dicom(frame: bytes, rows: int = 256, cols: int = 256) -> bytes:
    """A JPEG 2000 Lossless DICOM whose (complete) encapsulated frame is ``frame``."""
    ds = make_dataset(np.zeros((rows, cols), np.uint16), bits_stored=12, with_pixels=False)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def _j2k_codestream(rows: int, cols: int) -> bytes:
    ds = make_dataset(noise((rows, cols)).astype(np.uint16) * 16, bits_stored=12)
    ds.compress(JPEG2000Lossless)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


J2K_CASES = {
    # Frames that reach the reduced-resolution JPEG 2000 decoder (a target size is given).
    "jpeg 2000 codestream cut in half": (lambda: _j2k_dicom(cut(_j2k_codestream(256, 256), 0.5)), {"truncated", "corrupt"}),
    "jpeg 2000 frame larger than the header": (lambda: _j2k_dicom(_j2k_codestream(512, 512)), {"corrupt"}),
    "random bytes as a jpeg 2000 frame": (lambda: _j2k_dicom(np.random.default_rng(1).bytes(5000)), {"corrupt"}),
}


@pytest.mark.parametrize("case", list(J2K_CASES))
def test_bad_jpeg2000_frames_with_a_target_size(case):
    builder, codes = J2K_CASES[case]
    with pytest.raises(DecodeError) as info:
        decode_image(builder(), "bad-j2k.dcm", target_size=224)
    assert info.value.code in codes, f"{case}: {info.value.code}: {info.value.message}"
    assert "bad-j2k.dcm" in info.value.message


def _claiming(stream: bytes, marker: bytes, offsets: tuple[int, ...], fmt: str, size: int) -> bytes:
    """``stream`` with the dimensions in the header segment after ``marker`` rewritten to ``size``."""
    data = bytearray(stream)
    at = data.index(marker)
    for offset in offsets:
        struct.pack_into(fmt, data, at + offset, size, size)
    return bytes(data)


def _jpeg_baseline_dicom(frame: bytes) -> bytes:
    ds = make_dataset(np.zeros((64, 64), np.uint8), with_pixels=False)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


LYING_CODESTREAMS = {
    # A small DICOM whose compressed frame declares 30,000 x 30,000 pixels: decoders allocate what
    # the codestream says (5.3 GB for this JPEG 2000 one before the guard), not what the header says.
    "jpeg 2000": lambda: _j2k_dicom(
        _claiming(_j2k_codestream(256, 256), b"\xff\x51", (6, 22), ">II", 30_000)  # SIZ: Xsiz/Ysiz, XTsiz/YTsiz
    ),
    "jpeg baseline": lambda: _jpeg_baseline_dicom(
        _claiming(jpeg_bytes(noise((64, 64))), b"\xff\xc0", (5,), ">HH", 30_000)  # SOF0: height, width
    ),
}


@pytest.mark.parametrize("codec", list(LYING_CODESTREAMS))
@pytest.mark.parametrize("target_size", [None, 224])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(codec, target_size):
    data = LYING_CODESTREAMS[codec]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: decoders allocate outside Python
    with pytest.raises(DecodeError) as info:
        decode_image(data, "lying.dcm", target_size=target_size)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert info.value.code == "corrupt" and "declares 30000x30000" in info.value.message
    assert grown_mib < 256, f"the decoder ran: peak resident memory grew {grown_mib:.0f} MiB"


def _element_flood(elements: int) -> bytes:
    """A valid small DICOM with ``elements`` tiny private elements (14 bytes each) in its header."""
    base = make_dicom()
    flood = np.zeros(
        elements,
        dtype=[("group", "<u2"), ("element", "<u2"), ("vr", "S2"), ("reserved", "<u2"), ("length", "<u4"), ("value", "S2")],
    )
    index = np.arange(elements)
    flood["group"] = 0x0009 + 2 * (index // 0xF000)  # odd (private) groups before (0010,xxxx)
    flood["element"] = 0x1000 + index % 0xF000
    flood["vr"], flood["length"], flood["value"] = b"UN", 2, b"ab"
    at = base.index(struct.pack("<HH", 0x0010, 0x0010))  # insert before Patient's Name
    return base[:at] + flood.tobytes() + base[at:]


def test_a_header_flooded_with_elements_is_refused_within_the_header_budget():
    data = _element_flood(300_000)  # 4.2 MB of header: parsed whole, it takes 93 MiB of Python objects
    policy = DecodePolicy(max_header_bytes=256 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode_image(data, "flood.dcm", policy=policy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "too_large" and "max_header_bytes" in info.value.message
    assert peak < 40 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB"
    # The same file is fine under the default budget (16 MB), and so is any header within budget.
    assert decode_image(data, "flood.dcm").pixels.shape == (48, 64)
    assert decode_image(make_dicom(), "small.dcm", policy=policy).pixels.shape == (48, 64)
