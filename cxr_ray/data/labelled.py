"""Labelled image sets: where the files are, what class each one is, and turning them into tensors.

Two layouts are accepted, local or on s3://:

* a **folder tree** with one sub-folder per class (``root/covid/a.png``,
  ``root/normal/b.dcm``, deeper nesting allowed; the first folder below the
  root names the class; files directly in the root are ignored and counted);
* a **manifest**, ``.csv`` or ``.parquet``, with columns ``path``, ``label``
  and optionally ``patient_id``; relative paths resolve against the
  manifest's own directory (so ``cxr-ray synth``'s ``labels.csv`` works as is).

:func:`decode_batch` is the per-batch function the training pipeline maps
over the table (Ray Data ``map_batches`` in :mod:`cxr_ray.train.ingest`): it
reads, hashes (duplicate detection, data fingerprint) and decodes each file
through :func:`cxr_ray.io.inputs.load_input` and resizes it with the first
step of :func:`cxr_ray.preprocess.preprocess` (:func:`~cxr_ray.preprocess.resize_square`):
the cache holds *unit* images in [0, 1], which training augments and then
standardises with the second step (:func:`~cxr_ray.preprocess.standardise`),
so an evaluation tensor is exactly what screening and serving feed the same
model. Undecodable files are returned with ``status="error"`` and their
decode error code, never raised.

Plain Python: no Ray here.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr_ray.errors import DecodeError, UsageError
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.pseudonym import key_from_env
from cxr_ray.io.storage import InputNotFoundError, expand_inputs, get_filesystem, is_remote
from cxr_ray.preprocess import PreprocessConfig, resize_square

MANIFEST_SUFFIXES = (".csv", ".parquet")
# Key for the in-memory DICOM patient pseudonyms used only to group images by
# patient when the operator supplied none (the pseudonyms are never written out).
_GROUPING_KEY = b"cxr-ray-patient-grouping"


@dataclass
class LabelledSource:
    """The labelled table before decoding: one row per listed file."""

    frame: pd.DataFrame  # columns: path (URI), label (class name), patient_id (str, "" when unknown)
    classes: list[str]
    layout: str  # "folders" | "manifest"
    report: dict = field(default_factory=dict)


def is_manifest(spec: str) -> bool:
    return str(spec).lower().endswith(MANIFEST_SUFFIXES)


def read_labelled(spec: str, *, s3_endpoint: str | None = None, classes: list[str] | None = None,
                  keep_columns: list[str] | None = None) -> LabelledSource:
    """List a labelled set (folder tree or manifest). No file is opened except the manifest.

    ``classes`` fixes the label list and its order (e.g. the classes of a model
    being evaluated); rows with other labels are dropped and counted. Without
    it the classes are the sorted distinct labels. ``keep_columns``: further
    manifest columns to carry along as text (e.g. ``source`` for per-group reports).
    """
    spec = os.fspath(spec)
    if is_manifest(spec):
        frame, report = _read_manifest(spec, s3_endpoint, keep_columns or [])
        layout = "manifest"
    elif keep_columns:
        raise UsageError(f"{spec}: columns {keep_columns} need a .csv/.parquet manifest, not a folder tree")
    else:
        frame, report = _read_folders(spec, s3_endpoint)
        layout = "folders"
    frame["label"] = frame["label"].astype(str).str.strip()
    if classes is None:
        classes = sorted(frame["label"].unique())
    else:
        unknown = ~frame["label"].isin(classes)
        if unknown.any():
            report["unknown_label"] = int(unknown.sum())
            report["unknown_labels"] = sorted(frame.loc[unknown, "label"].unique())[:20]
            frame = frame[~unknown]
    if frame.empty:
        raise UsageError(f"{spec}: no labelled images found ({report})")
    if len(classes) < 2:
        raise UsageError(f"{spec}: need at least 2 classes, found {classes}")
    frame = frame.reset_index(drop=True)
    report.update(
        layout=layout,
        files=int(len(frame)),
        classes=list(classes),
        per_class={c: int((frame["label"] == c).sum()) for c in classes},
    )
    return LabelledSource(frame=frame, classes=list(classes), layout=layout, report=report)


def _read_folders(spec: str, s3_endpoint: str | None) -> tuple[pd.DataFrame, dict]:
    root = spec.rstrip("/") if is_remote(spec) else os.path.abspath(os.path.expanduser(spec))
    rows, outside = [], 0
    for uri in expand_inputs(spec, s3_endpoint=s3_endpoint):
        relative = uri[len(root):].lstrip("/") if is_remote(uri) else os.path.relpath(uri, root)
        parts = relative.replace(os.sep, "/").split("/")
        if len(parts) < 2:
            outside += 1
            continue
        rows.append((uri, parts[0], ""))
    frame = pd.DataFrame(rows, columns=["path", "label", "patient_id"])
    report = {"source": spec}
    if outside:
        report["files_outside_class_folders"] = outside  # type: ignore[assignment]
    if frame.empty:
        raise UsageError(
            f"{spec}: no files in class sub-folders; expected root/<class>/<image> or a .csv/.parquet manifest"
        )
    return frame, report


def _read_manifest(spec: str, s3_endpoint: str | None, keep_columns: list[str]) -> tuple[pd.DataFrame, dict]:
    fs, path = get_filesystem(spec, s3_endpoint)
    try:
        with fs.open(path, "rb") as handle:
            if path.lower().endswith(".parquet"):
                table = pd.read_parquet(handle)
            else:
                table = pd.read_csv(handle, dtype=str, keep_default_na=False, encoding_errors="replace")
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"manifest not found: {spec}") from exc
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise UsageError(f"manifest {spec} lacks column(s) {missing}; needs path,label[,patient_id] (has {list(table.columns)})")
    path_col, label_col = _text(table["path"]), _text(table["label"])
    blank = (path_col == "") | (label_col == "")
    patient = _text(table["patient_id"]) if "patient_id" in table.columns else pd.Series("", index=table.index)
    remote = is_remote(spec)
    base = posixpath.dirname(spec) if remote else os.path.dirname(path)
    resolved = [_resolve(entry, base, remote) for entry in path_col[~blank]]
    frame = pd.DataFrame({"path": resolved, "label": label_col[~blank].to_numpy(), "patient_id": patient[~blank].to_numpy()})
    absent = [c for c in keep_columns if c not in table.columns]
    if absent:
        raise UsageError(f"manifest {spec} has no column(s) {absent}; its columns are {list(table.columns)}")
    for column in keep_columns:
        frame[column] = _text(table[column])[~blank].to_numpy()
    report = {"source": spec, "manifest_rows": int(len(table))}
    if blank.any():
        report["rows_without_path_or_label"] = int(blank.sum())
    return frame, report


def _text(column: pd.Series) -> pd.Series:
    """Stripped strings; missing values (None, NaN, "nan") become ""."""
    def one(value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        text = str(value).strip()
        return "" if text.lower() in ("nan", "none") else text

    return column.map(one).astype(object)


def _resolve(entry: str, base: str, remote_base: bool) -> str:
    if "://" in entry:
        return entry.split("://", 1)[1] if entry.startswith("file://") else entry
    if entry.startswith("/"):
        return entry
    if remote_base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, entry))
    return os.path.normpath(os.path.join(base, entry))


# --------------------------------------------------------------------------- decoding


def grouping_key(env_name: str | None = None) -> bytes:
    """Key for the DICOM patient pseudonyms that group images by patient.

    The operator's key from the environment variable ``env_name`` (as for
    ``cxr-ray screen --pseudonym-key-env``), else a fixed internal key: the
    pseudonyms only group rows in memory and are never written out.
    """
    return key_from_env(env_name) or _GROUPING_KEY


# Decode metadata a training run keeps per image for its drift fingerprint (no identifiers).
HEADER_KEYS = ("format", "modality", "photometric_interpretation", "manufacturer", "rows", "cols")


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    preprocessing: dict,
    s3_endpoint: str | None = None,
    pseudonym_key: bytes | None = None,
) -> dict[str, np.ndarray]:
    """Read, hash, decode and resize a batch of ``{"row_id", "path", "label"}``.

    Returns ``row_id``, ``label``, ``sha256``, ``status`` ("ok" | "error"),
    ``error_code``, ``patient_pseudonym``, ``view``, the :data:`HEADER_KEYS`
    (the header mix of the model's drift fingerprint) and ``image`` (the unit
    image, float32 (n, 1, S, S) in [0, 1]; zeros where ``status`` is "error").
    """
    config = PreprocessConfig.from_dict(preprocessing)
    size = config.image_size
    policy = InputPolicy(target_size=size, pseudonym_key=pseudonym_key, s3_endpoint=s3_endpoint, sha256=True)
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, 1, size, size), dtype=np.float32)
    sha, status, code, pseudonym, view = ([""] * n for _ in range(5))
    # "" and 0 for absent values, never None: a batch where a key is all None would give Arrow a null column.
    header: dict[str, list] = {key: [0 if key in ("rows", "cols") else ""] * n for key in HEADER_KEYS}
    for i, path in enumerate(paths):
        try:
            loaded = load_input(path, policy)
        except DecodeError as exc:  # unreadable (read_failed), too large or undecodable
            status[i], code[i] = "error", exc.code
            continue
        sha[i] = loaded.sha256 or ""
        images[i, 0] = resize_square(loaded.image.pixels, size)
        status[i] = "ok"
        pseudonym[i] = loaded.image.meta.patient_pseudonym or ""
        view[i] = loaded.image.meta.view_position or ""
        for key in HEADER_KEYS:
            header[key][i] = getattr(loaded.image.meta, key) or header[key][i]
    return {
        "row_id": np.asarray(batch["row_id"], dtype=np.int64),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "sha256": np.array(sha, dtype=object),
        "status": np.array(status, dtype=object),
        "error_code": np.array(code, dtype=object),
        "patient_pseudonym": np.array(pseudonym, dtype=object),
        "view": np.array(view, dtype=object),
        **{key: np.array(values, dtype=np.int64 if key in ("rows", "cols") else object)
           for key, values in header.items()},
        "image": images,
    }
