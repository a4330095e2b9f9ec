"""Patient-level splits, k-fold, duplicate removal, class weights and the data fingerprint.

All functions work on a plain table (one row per decodable image) with the
columns ``path``, ``label`` (class index), ``group`` (see :func:`patient_groups`)
and ``sha256`` (content hash of the file's bytes). No Ray, no torch: the
training driver calls them on metadata only, never on pixels.

Why patient level: two radiographs of one patient look more alike than two
patients with the same disease, so a split by image would let a model score
well by recognising patients. Every split here keeps all images of a patient
(a *group*) on one side, stratified by label with scikit-learn's
``StratifiedGroupKFold``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxr_ray.errors import UsageError

PATIENT_PREFIX = "patient:"
FILE_PREFIX = "file:"  # a file without patient id is its own group
NO_PATIENT_NOTE = (
    "files without a patient id are each their own group: two such images of one "
    "patient may land in different splits"
)


# --------------------------------------------------------------------------- groups


def patient_groups(frame: pd.DataFrame) -> tuple[pd.Series, dict]:
    """The split group of every row and a report of where the groups came from.

    Group = ``patient_id`` (manifest column) when given, else the DICOM
    ``patient_pseudonym`` (keyed HMAC of PatientID) when present, else the file
    itself. The report counts each source and says so when files had none.
    """
    def column(name: str) -> pd.Series:
        if name not in frame:
            return pd.Series([""] * len(frame), index=frame.index, dtype=object)
        return frame[name].astype(object).where(frame[name].notna(), "").astype(str).str.strip()

    patient = column("patient_id")
    pseudonym = column("patient_pseudonym")
    from_manifest = patient != ""
    from_dicom = ~from_manifest & (pseudonym != "")
    groups = pd.Series(FILE_PREFIX + frame["path"].astype(str), index=frame.index)
    groups[from_dicom] = "dicom:" + pseudonym[from_dicom]
    groups[from_manifest] = PATIENT_PREFIX + patient[from_manifest]
    without = int((~from_manifest & ~from_dicom).sum())
    report = {
        "groups": int(groups.nunique()),
        "files_with_patient_id": int(from_manifest.sum()),
        "files_with_dicom_patient_pseudonym": int(from_dicom.sum()),
        "files_without_patient_id": without,
    }
    if without:
        report["note"] = NO_PATIENT_NOTE  # type: ignore[assignment]
    return groups, report


# --------------------------------------------------------------------------- splitting


def _n_splits_for(fraction: float, what: str) -> int:
    if not 0 < fraction < 1:
        raise UsageError(f"{what} must be in (0, 1), got {fraction}")
    return max(2, round(1 / fraction))


def _one_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, what: str) -> np.ndarray:
    """Boolean mask of the rows in one stratified group fold of ``n_splits``."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise UsageError(f"cannot carve a {what} split from {n_groups} patient group(s); need at least 2")
    n_splits = min(n_splits, n_groups)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": expected for rare classes
        warnings.simplefilter("ignore", UserWarning)
        _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def carve(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int, what: str = "held-out") -> np.ndarray:
    """Mask of about ``fraction`` of the rows, whole groups only, stratified by label."""
    labels, groups = np.asarray(labels), np.asarray(groups)  # type: ignore[assignment]
    return _one_fold(labels, groups, _n_splits_for(fraction, what), seed, what)  # type: ignore[arg-type]


def train_val_test_split(
    frame: pd.DataFrame, *, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0
) -> pd.Series:
    """``"train"`` / ``"val"`` / ``"test"`` per row, patient-level and stratified.

    The test split is carved first (about ``test_fraction`` of the rows), then
    the validation split from the rest (about ``val_fraction`` of the whole).
    ``test_fraction=0`` makes no test split.
    """
    split = pd.Series("train", index=frame.index, dtype=object)
    labels, groups = frame["label"].to_numpy(), frame["group"].to_numpy()
    rest = np.ones(len(frame), dtype=bool)
    if test_fraction > 0:
        test = carve(labels, groups, test_fraction, seed, "test")
        split[test] = "test"
        rest = ~test
    if val_fraction > 0:
        share = val_fraction / (1 - max(test_fraction, 0))
        val = carve(labels[rest], groups[rest], min(share, 0.5), seed + 1, "validation")
        split.iloc[np.flatnonzero(rest)[val]] = "val"
    return split


def kfold_assign(frame: pd.DataFrame, k: int, *, seed: int = 0) -> pd.Series:
    """Fold index 0..k-1 per row: ``StratifiedGroupKFold`` over patient groups."""
    groups = frame["group"].to_numpy()
    n_groups = len(np.unique(groups))
    if k < 2:
        raise UsageError(f"--folds must be >= 2, got {k}")
    if n_groups < k:
        raise UsageError(f"{k}-fold CV needs at least {k} patient groups; the data has {n_groups}")
    fold = np.full(len(frame), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, (_, held) in enumerate(splitter.split(np.zeros(len(frame)), frame["label"].to_numpy(), groups)):
            fold[held] = i
    return pd.Series(fold, index=frame.index)


def check_disjoint(frame: pd.DataFrame, split_column: str) -> None:
    """Raise if a patient group or a content hash appears in two splits (a leak)."""
    for key in ("group", "sha256"):
        if key not in frame:
            continue
        spread = frame.groupby(key)[split_column].nunique()
        leaked = spread[spread > 1]
        if len(leaked):
            raise AssertionError(f"{len(leaked)} {key} value(s) appear in more than one {split_column}")


# --------------------------------------------------------------------------- duplicates


def deduplicate(frame: pd.DataFrame, split_column: str, priority: Sequence) -> tuple[pd.DataFrame, dict]:
    """Keep one copy of each byte-identical image, in one split; report what was found.

    Copies are found by ``sha256``. The kept copy is the one in the split that
    comes first in ``priority`` (training splits first, so an evaluation split
    never holds an image the model trained on), then the first path. Copies
    with different labels contradict each other: all of them are dropped.
    """
    rank = {name: i for i, name in enumerate(priority)}
    missing = set(frame[split_column].unique()) - set(rank)
    if missing:
        raise ValueError(f"splits {sorted(missing)} have no priority (given {list(priority)})")
    dup = frame[frame.duplicated("sha256", keep=False)]
    report: dict[str, Any] = {
        "duplicate_sets": 0,
        "files_in_duplicate_sets": int(len(dup)),
        "across_splits": 0,
        "within_split": 0,
        "conflicting_labels": 0,
        "files_removed": 0,
        "examples": [],
    }
    if dup.empty:
        return frame, report
    order = dup.assign(_rank=dup[split_column].map(rank)).sort_values(["sha256", "_rank", "path"])
    drop: list = []
    for digest, copies in order.groupby("sha256", sort=True):
        report["duplicate_sets"] += 1
        crossing = copies[split_column].nunique() > 1
        report["across_splits" if crossing else "within_split"] += 1
        conflict = copies["label"].nunique() > 1
        if conflict:
            report["conflicting_labels"] += 1
            drop.extend(copies.index)
        else:
            drop.extend(copies.index[1:])
        if len(report["examples"]) < 20:
            report["examples"].append(
                {
                    "sha256": digest[:16],
                    "files": [str(p).rsplit("/", 1)[-1] for p in copies["path"]],
                    "splits": [str(s) for s in copies[split_column]],
                    "kept": None if conflict else str(copies["path"].iloc[0]).rsplit("/", 1)[-1],
                    "labels_conflict": bool(conflict),
                }
            )
    report["files_removed"] = len(drop)
    return frame.drop(index=drop), report


# --------------------------------------------------------------------------- weights, fingerprint


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """``n / (K * n_c)`` per class ("balanced"); classes absent from ``labels`` get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, total / (num_classes * np.maximum(counts, 1)), 0.0)
    return [float(w) for w in weights]


def data_fingerprint(sha256s: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 over the sorted ``(content hash, label name)`` pairs of the images used."""
    digest = hashlib.sha256()
    for content, label in sorted(zip(map(str, sha256s), map(str, labels), strict=True)):
        digest.update(f"{content}\t{label}\n".encode())
    return digest.hexdigest()
