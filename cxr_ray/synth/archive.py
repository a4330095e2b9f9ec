"""A phantom archive on disk (or s3://): images, lesion masks and ``labels.csv``.

Layout under ``out_dir``::

    images/<patient_id>/<image_id>[.dcm|.png|.jpg|.jpeg|no extension]
    masks/<patient_id>/<image_id>.png     uint8 0/255, same size as the image
    labels.csv                            one row per file under images/
    synth.json                            the parameters and class -> pattern map

``labels.csv`` columns: ``path`` (relative to ``out_dir``, so the file is also
a manifest for ``expand_inputs``), ``label``, ``patient_id``, ``view``,
``mask_path``, ``format`` (dicom | png | jpeg | unknown), ``variant`` (how
the file was encoded), ``corrupt`` and ``expected_error`` (the decode error
code a corrupt file must produce). Corrupt files have no label and no mask.

``n`` counts every file: ``round(n * corrupt_fraction)`` of them (at least
one when the fraction is positive) are corrupt, the rest are phantoms of
2-4 images per patient, each patient with one class. Everything is drawn
from generators seeded by ``(seed, purpose, index)``, so one seed always
gives the same bytes, whatever else changes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr_ray.errors import UsageError
from cxr_ray.io import storage
from cxr_ray.synth import writers
from cxr_ray.synth.patterns import Pattern, assign_patterns
from cxr_ray.synth.phantom import (
    Anatomy,
    render_chest,
    render_ct_slice,
    render_lateral,
    sample_anatomy,
    sample_pose,
)

FORMAT_ALIASES = {"dcm": "dcm", "dicom": "dcm", "png": "png", "jpg": "jpg", "jpeg": "jpg"}
FORMAT_NAMES = {"dcm": "dicom", "png": "png", "jpg": "jpeg"}
LABEL_COLUMNS = [
    "path",
    "label",
    "patient_id",
    "view",
    "mask_path",
    "format",
    "variant",
    "corrupt",
    "expected_error",
]
# Corrupt kinds, their decode error code, and their format column.
CORRUPT_KINDS = (
    ("truncated_dicom", "truncated", "dicom"),
    ("random_bytes", "not_an_image", "unknown"),
    ("empty_file", "empty", "unknown"),
    ("text_as_png", "not_an_image", "unknown"),
    ("lateral_dicom", "lateral_view", "dicom"),
    ("ct_dicom", "unsupported_modality", "dicom"),
)
OUR_OUTPUTS = ("images", "masks", "labels.csv", "synth.json")
MIN_SIZE, MAX_SIZE = 64, 4096

# Seed streams: one generator per (seed, purpose, index).
_PATIENT, _IMAGE, _CORRUPT, _CLASS_BLOCK, _FORMAT_BLOCK, _CORRUPT_ORDER = range(6)


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    label: str
    anatomy: Anatomy
    n_images: int
    birth_date: str
    sex: str


def _rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, index])


def normalise_formats(formats: str | Sequence[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        key = item.strip().lower().lstrip(".")
        if key not in FORMAT_ALIASES:
            raise UsageError(f"unknown format {item!r}; valid: dcm (dicom), png, jpg (jpeg)")
        if FORMAT_ALIASES[key] not in out:
            out.append(FORMAT_ALIASES[key])
    if not out:
        raise UsageError("no formats given; valid: dcm, png, jpg")
    return out


def normalise_classes(classes: str | Sequence[str]) -> list[str]:
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    out = [c.strip() for c in items if c.strip()]
    if not out:
        raise UsageError("no classes given, e.g. --classes covid,pneumonia,normal")
    duplicates = sorted({c for c in out if out.count(c) > 1})
    if duplicates:
        raise UsageError(f"duplicate class names: {duplicates}")
    bad = [c for c in out if "," in c or "/" in c]
    if bad:
        raise UsageError(f"class names may not contain ',' or '/': {bad}")
    return out


def _corrupt_count(n: int, fraction: float) -> int:
    count = int(round(n * fraction))
    if fraction > 0 and count == 0 and n > 1:
        count = 1
    return min(count, n)


def _plan_patients(n_images: int, classes: list[str], seed: int) -> list[_Patient]:
    patients: list[_Patient] = []
    remaining = n_images
    k = len(classes)
    while remaining > 0:
        p = len(patients)
        rng = _rng(seed, _PATIENT, p)
        order = _rng(seed, _CLASS_BLOCK, p // k).permutation(k)
        count = min(int(rng.integers(2, 5)), remaining)
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 65)))
        patients.append(
            _Patient(
                patient_id=f"PH{p + 1:05d}",
                label=classes[int(order[p % k])],
                anatomy=sample_anatomy(rng),
                n_images=count,
                birth_date=birth.strftime("%Y%m%d"),
                sex=str(rng.choice(["F", "M"])),
            )
        )
        remaining -= count
    return patients


class _Sink:
    """Writes files under ``out_dir`` (local or remote), atomically per file."""

    def __init__(self, out_dir: str, s3_endpoint: str | None):
        self.out_dir = out_dir
        self.s3_endpoint = s3_endpoint

    def uri(self, relative: str) -> str:
        return storage.join(self.out_dir, *relative.split("/"))

    def write(self, relative: str, data: bytes) -> None:
        with storage.open_output(self.uri(relative), "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(data)


def _prepare_out_dir(out_dir: str, overwrite: bool, s3_endpoint: str | None) -> str:
    fs, path = storage.get_filesystem(out_dir, s3_endpoint)
    if not storage.is_remote(out_dir):
        out_dir = path
        if os.path.isfile(path):
            raise UsageError(f"output {out_dir} is a file; give a directory")
        existing = sorted(os.listdir(path)) if os.path.isdir(path) else []
    else:
        out_dir = out_dir.rstrip("/")
        existing = sorted({name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}) if fs.exists(path) else []
    if not existing:
        return out_dir
    if not overwrite:
        raise UsageError(
            f"output {out_dir} is not empty ({len(existing)} entries); choose a new directory "
            "or pass overwrite=True / --overwrite to replace a previous synth output"
        )
    foreign = [name for name in existing if name not in OUR_OUTPUTS]
    if foreign:
        raise UsageError(
            f"output {out_dir} holds files synth did not write ({foreign[:5]}); refusing to overwrite"
        )
    for name in existing:
        fs.rm(f"{path}/{name}", recursive=True)
    return out_dir


def generate_archive(
    out_dir: str,
    n: int = 300,
    formats: str | Sequence[str] = ("dcm", "png", "jpg"),
    classes: str | Sequence[str] = ("covid", "pneumonia", "normal"),
    corrupt_fraction: float = 0.0,
    seed: int = 0,
    size: int = 256,
    *,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> pd.DataFrame:
    """Write a phantom archive and return its labels table (also ``labels.csv``)."""
    n = int(n)
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    if not 0.0 <= float(corrupt_fraction) <= 1.0:
        raise UsageError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise UsageError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    if int(seed) < 0:
        raise UsageError(f"seed must be >= 0, got {seed}")
    seed, size = int(seed), int(size)
    fmt_list = normalise_formats(formats)
    class_list = normalise_classes(classes)
    patterns = assign_patterns(class_list)
    out_dir = _prepare_out_dir(str(out_dir), overwrite, s3_endpoint)
    sink = _Sink(out_dir, s3_endpoint)

    n_corrupt = _corrupt_count(n, float(corrupt_fraction))
    patients = _plan_patients(n - n_corrupt, class_list, seed)
    rows: list[dict] = []
    index = 0
    for patient in patients:
        for _ in range(patient.n_images):
            rows.append(_write_phantom(sink, patient, patterns[patient.label], fmt_list, seed, index, size))
            index += 1
    order = _rng(seed, _CORRUPT_ORDER, 0).permutation(len(CORRUPT_KINDS))
    for j in range(n_corrupt):
        kind = CORRUPT_KINDS[int(order[j % len(CORRUPT_KINDS)])]
        rows.append(_write_corrupt(sink, kind, patients, seed, j, index, size))
        index += 1

    labels = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    sink.write("labels.csv", labels.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    params = {
        "generator": "cxr-ray synth",
        "n": n,
        "formats": fmt_list,
        "classes": class_list,
        "patterns": {name: pattern.describe() for name, pattern in patterns.items()},
        "corrupt_fraction": float(corrupt_fraction),
        "seed": seed,
        "size": size,
        "jpeg2000": writers.jpeg2000_available(),
    }
    sink.write("synth.json", (json.dumps(params, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return labels


def _write_phantom(
    sink: _Sink, patient: _Patient, pattern: Pattern, formats: list[str], seed: int, index: int, size: int
) -> dict:
    rng = _rng(seed, _IMAGE, index)
    fmt = formats[int(_rng(seed, _FORMAT_BLOCK, index // len(formats)).permutation(len(formats))[index % len(formats)])]
    view = "AP" if rng.random() < 0.25 else "PA"
    rendered = render_chest(patient.anatomy, sample_pose(rng, view), pattern, rng, size)
    image_id = f"IMG_{index + 1:06d}"
    if fmt == "dcm":
        options = writers.sample_dicom_options(rng)
        identity = _identity(patient, rng, seed, index)
        data = writers.encode_dicom(rendered.image, identity, options, view)
        name = image_id + ".dcm" if rng.random() < 0.75 else f"IM{index + 1:06d}"
        variant = options.describe()
    elif fmt == "png":
        kind = ["gray8", "gray16", "rgb8"][int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        data = writers.encode_png(rendered.image, kind)
        name, variant = image_id + ".png", kind
    else:
        rgb = bool(rng.random() < 0.15)
        quality = int(rng.integers(85, 97))
        data = writers.encode_jpeg(rendered.image, rgb=rgb, quality=quality)
        name = image_id + (".jpg" if rng.random() < 0.8 else ".jpeg")
        variant = f"{'rgb8' if rgb else 'gray8'}/q{quality}"
    path = f"images/{patient.patient_id}/{name}"
    mask_path = f"masks/{patient.patient_id}/{image_id}.png"
    sink.write(path, data)
    sink.write(mask_path, writers.encode_mask(rendered.mask))
    return {
        "path": path,
        "label": patient.label,
        "patient_id": patient.patient_id,
        "view": view,
        "mask_path": mask_path,
        "format": FORMAT_NAMES[fmt],
        "variant": variant,
        "corrupt": False,
        "expected_error": None,
    }


def _identity(patient: _Patient, rng: np.random.Generator, seed: int, index: int) -> writers.DicomIdentity:
    study = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 900)))
    return writers.DicomIdentity(
        patient_id=patient.patient_id,
        patient_name=f"PHANTOM^{patient.patient_id}",
        birth_date=patient.birth_date,
        sex=patient.sex,
        study_date=study.strftime("%Y%m%d"),
        accession=f"ACC{seed % 10_000:04d}{index + 1:06d}",
        uid_key=f"cxr-ray-synth/{seed}/{index}",
    )


def _write_corrupt(
    sink: _Sink, kind: tuple[str, str, str], patients: list[_Patient], seed: int, j: int, index: int, size: int
) -> dict:
    name_kind, code, fmt = kind
    rng = _rng(seed, _CORRUPT, j)
    if patients:
        patient = patients[int(rng.integers(len(patients)))]
    else:  # every file is corrupt: invent an owner
        patient = _plan_patients(1, ["unused"], seed + 1)[0]
    image_id = f"IMG_{index + 1:06d}"
    view = None
    if name_kind == "truncated_dicom":
        image = render_chest(patient.anatomy, sample_pose(rng, "PA"), _CLEAR, rng, size).image
        options = writers.DicomOptions("CR", "MONOCHROME2", 12, None, True, "explicit")
        full = writers.encode_dicom(image, _identity(patient, rng, seed, index), options, "PA")
        data = writers.truncate(full, rng, pixel_bytes=image.size * 2)
        name = image_id + ".dcm"
    elif name_kind == "random_bytes":
        data = writers.random_bytes(rng)
        name = image_id + [".dcm", ".png", ".jpg", ""][int(rng.integers(4))]
    elif name_kind == "empty_file":
        data = b""
        name = image_id + [".dcm", ".png"][int(rng.integers(2))]
    elif name_kind == "text_as_png":
        data = writers.NOT_AN_IMAGE_TEXT
        name = image_id + ".png"
    elif name_kind == "lateral_dicom":
        data = writers.encode_lateral_dicom(render_lateral(patient.anatomy, rng, size), _identity(patient, rng, seed, index))
        name, view = image_id + ".dcm", "LL"
    elif name_kind == "ct_dicom":
        data = writers.encode_ct_dicom(render_ct_slice(rng, size), _identity(patient, rng, seed, index))
        name = image_id + ".dcm"
    else:  # pragma: no cover - CORRUPT_KINDS is closed
        raise AssertionError(name_kind)
    path = f"images/{patient.patient_id}/{name}"
    sink.write(path, data)
    return {
        "path": path,
        "label": None,
        "patient_id": patient.patient_id,
        "view": view,
        "mask_path": None,
        "format": fmt,
        "variant": name_kind,
        "corrupt": True,
        "expected_error": code,
    }


_CLEAR = Pattern("normal", "clear")


def summarize(labels: pd.DataFrame, out_dir: str, seconds: float | None = None) -> dict:
    """The JSON summary ``cxr-ray synth`` prints."""
    good = labels[~labels["corrupt"]]
    bad = labels[labels["corrupt"]]
    summary = {
        "out_dir": out_dir,
        "labels": storage.join(out_dir, "labels.csv"),
        "files": int(len(labels)),
        "images": int(len(good)),
        "patients": int(good["patient_id"].nunique()),
        "corrupt": int(len(bad)),
        "by_class": {str(k): int(v) for k, v in good["label"].value_counts().sort_index().items()},
        "by_format": {str(k): int(v) for k, v in good["format"].value_counts().sort_index().items()},
        "corrupt_by_error": {str(k): int(v) for k, v in bad["expected_error"].value_counts().sort_index().items()},
    }
    if seconds is not None:
        summary["seconds"] = round(seconds, 3)
        summary["files_per_s"] = round(len(labels) / seconds, 1) if seconds > 0 else None
    return summary


__all__ = ["CORRUPT_KINDS", "LABEL_COLUMNS", "generate_archive", "summarize"]
