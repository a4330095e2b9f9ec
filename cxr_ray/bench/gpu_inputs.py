"""Inputs of ``cxr-ray bench gpu``: phantom DICOMs in the GPU codecs' syntaxes, and real files.

Phantoms are rendered here (:mod:`cxr_ray.synth`), a few distinct chests at the archive's size,
each written as JPEG 2000 Lossless (pydicom + OpenJPEG), JPEG Baseline (Pillow) and, where
nvImageCodec can encode it on the GPU, HTJ2K Lossless; the set is then repeated to ``count``
inputs (decoders do not cache, so the same bytes cost the same each time). A syntax that cannot
be written here is listed with the reason instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.uid import HTJ2KLossless

from cxr_ray.io.decode import sniff_format
from cxr_ray.io.gpu.codec import import_nvimgcodec
from cxr_ray.synth import writers
from cxr_ray.synth.patterns import assign_patterns
from cxr_ray.synth.phantom import render_chest, sample_anatomy, sample_pose

PHANTOM_KINDS = ("jpeg2000", "jpeg", "htj2k")


def _identity(index: int) -> writers.DicomIdentity:
    return writers.DicomIdentity(f"BENCH{index:04d}", f"PHANTOM^{index}", "19700101", "O", "20200101",
                                 f"ACC{index:06d}", f"bench-gpu-{index}")


def _htj2k_codestream(stored: np.ndarray) -> bytes:
    """HTJ2K Lossless codestream of ``stored`` (uint16 grey) by nvImageCodec's GPU encoder."""
    nv = import_nvimgcodec()
    params = nv.EncodeParams(quality_type=nv.QualityType.LOSSLESS, jpeg2k_encode_params=nv.Jpeg2kEncodeParams(
        bitstream_type=nv.Jpeg2kBitstreamType.J2K, ht=True))
    host = np.ascontiguousarray(stored[..., None])
    encoder = nv.Encoder()
    stream = encoder.encode(host, "jpeg2k", params=params)
    if stream is None:  # some versions encode from device memory only
        stream = encoder.encode(torch.from_numpy(host.astype(np.int32)).to(torch.uint16).cuda(), "jpeg2k", params=params)
    if stream is None:
        raise RuntimeError("nvImageCodec returned no code stream")
    try:
        return bytes(memoryview(stream))
    except TypeError:
        return np.asarray(stream, dtype=np.uint8).tobytes()


def _one_phantom(index: int, size: int, kinds: tuple[str, ...], skipped: dict[str, str]) -> dict[str, bytes]:
    rng = np.random.default_rng(1000 + index)
    pattern = list(assign_patterns(["covid", "pneumonia", "normal"]).values())[index % 3]
    image = render_chest(sample_anatomy(rng), sample_pose(rng, "PA"), pattern, rng, size).image
    out: dict[str, bytes] = {}
    ident = _identity(index)
    for kind in kinds:
        if kind in skipped:
            continue
        try:
            if kind == "jpeg2000":
                options = writers.DicomOptions("DX", "MONOCHROME1", 12, None, True, "j2k")
                out[kind] = writers.encode_dicom(image, ident, options, "PA")
            elif kind == "jpeg":
                out[kind] = writers.encode_jpeg_dicom(image, ident)
            else:
                stored = np.rint(np.clip(image, 0, 1) * 4095).astype(np.uint16)
                out[kind] = writers.encode_dicom_frame(image, ident, _htj2k_codestream(stored), HTJ2KLossless, 12)
        except Exception as exc:  # noqa: BLE001 - a syntax this machine cannot write: listed, the rest go on
            skipped[kind] = f"cannot be written here: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def phantom_dicoms(distinct: int, size: int, kinds: tuple[str, ...] = PHANTOM_KINDS
                   ) -> tuple[dict[str, list[bytes]], dict[str, str]]:
    """``{kind: [file bytes]}`` of ``distinct`` phantoms per kind, and ``{kind: why not}``."""
    sets: dict[str, list[bytes]] = {kind: [] for kind in kinds}
    skipped: dict[str, str] = {}
    for index in range(distinct):
        for kind, data in _one_phantom(index, size, kinds, skipped).items():
            sets[kind].append(data)
    return {kind: files for kind, files in sets.items() if files and kind not in skipped}, skipped


def real_files(root: Path | None, limit: int) -> tuple[list[bytes], dict[str, Any]]:
    """Up to ``limit`` DICOM / PNG / JPEG files under ``root`` (by content), and what was found."""
    if root is None or not root.is_dir():
        return [], {"root": None if root is None else str(root), "files": 0, "reason": "no such directory"}
    files: list[bytes] = []
    formats: dict[str, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        fmt = sniff_format(data) if data else None
        if fmt is not None and len(files) < limit:
            files.append(data)
            formats[fmt] = formats.get(fmt, 0) + 1
    return files, {"root": str(root), "files": len(files), "formats": formats}


def repeat(files: list[bytes], count: int) -> list[bytes]:
    """``files`` cycled to ``count`` entries."""
    return [files[i % len(files)] for i in range(count)] if files else []


def write_inputs(directory: Path, files: list[bytes]) -> list[str]:
    """Each file under ``directory`` (the end-to-end run reads them from disk); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(files):
        path = directory / f"input-{i:05d}.bin"  # by content, never by extension
        path.write_bytes(data)
        paths.append(str(path))
    return paths
