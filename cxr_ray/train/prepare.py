"""Before any training: list the data, fix the classes and starting weights, decode once (Ray Data).

:func:`prepare` returns a :class:`Prepared`: everything the runs of one
command share (the decoded cache, the table of decodable rows with their
patient groups, the starting weights, reports). Undecodable files are reported
by error code and left out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_ray.data.labelled import grouping_key, read_labelled
from cxr_ray.data.splits import patient_groups
from cxr_ray.errors import ArtifactError, UsageError
from cxr_ray.models.artifact import load_card
from cxr_ray.models.build import build_model
from cxr_ray.models.card import PreprocessingRecord, new_card
from cxr_ray.models.transfer import extended_classes, init_from_source
from cxr_ray.models.weights import imagenet_state_dict
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.ingest import decode_dataset


def log(message: str, cfg: TrainConfig | None = None) -> None:
    """A progress line on stderr (stdout carries the JSON summary), unless ``cfg.quiet``."""
    if cfg is None or not cfg.quiet:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything about the data the runs share: decoded cache, metadata, reports."""

    classes: list[str]
    positive_class: str | None
    preprocessing: PreprocessingRecord
    table: pd.DataFrame  # decodable rows: row_id, path, label, label_name, patient_id, sha256, group
    decoded: Any  # ray.data.Dataset (materialized)
    report: dict[str, Any]
    initial_state: dict[str, torch.Tensor]
    init_report: dict[str, Any] | None = None
    source_classes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_classes(cfg: TrainConfig, data_classes: list[str]) -> tuple[list[str], list[str] | None]:
    """(the model's classes, the source model's classes or None).

    ``--label-space keep``: the data's classes. ``extend`` (DETL): the source
    artifact's classes in their order, then the data's new ones.
    """
    if not cfg.init:
        return data_classes, None
    try:
        source_classes = list(load_card(cfg.init, cfg.s3_endpoint).classes)
    except ArtifactError:
        if cfg.label_space == "extend":
            raise UsageError(f"--label-space extend needs --init to be a cxr-ray artifact; {cfg.init} is not") from None
        return data_classes, None
    if cfg.label_space == "extend":
        return extended_classes(source_classes, data_classes), source_classes
    return data_classes, source_classes


def _positive_class(cfg: TrainConfig, classes: list[str]) -> str | None:
    if cfg.positive_class in (None, "", "none"):
        return None
    if cfg.positive_class == "auto":
        return "covid" if "covid" in classes else None
    if cfg.positive_class not in classes:
        raise UsageError(f"--positive-class {cfg.positive_class!r} is not one of the classes {classes}")
    return cfg.positive_class


def initial_weights(
    cfg: TrainConfig, classes: list[str], source_classes: list[str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The starting weights, built once on the driver (errors surface before any worker starts)."""
    torch.manual_seed(cfg.seed)
    imagenet = imagenet_state_dict(cfg.arch, cfg.pretrained, s3_endpoint=cfg.s3_endpoint) if cfg.pretrained else None
    model = build_model(cfg.arch, len(classes), imagenet_state_dict=imagenet)
    report = None
    if cfg.init:
        report = init_from_source(model, cfg.arch, classes, cfg.init, s3_endpoint=cfg.s3_endpoint,
                                  source_classes=source_classes)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, report


def label_frame(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``row_id`` 0..n-1, ``label_name`` the class name and ``label`` its index (in place; returned)."""
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    frame["label_name"] = frame["label"]
    frame["label"] = frame["label_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    return frame


def undecodable_report(bad: pd.DataFrame) -> dict[str, Any]:
    """Count and codes of the rows that did not decode (training and evaluation reports say the same)."""
    return {
        "count": int(len(bad)),
        "by_code": {str(k): int(v) for k, v in bad["error_code"].value_counts().sort_index().items()},
        "examples": [
            {"file": str(p).rsplit("/", 1)[-1], "error_code": str(c)}
            for p, c in zip(bad["path"].head(20), bad["error_code"].head(20), strict=True)
        ],
    }


def prepare(cfg: TrainConfig) -> Prepared:
    """List, decode (Ray Data, cached), drop undecodable files, assign patient groups."""
    started = time.perf_counter()
    source = read_labelled(cfg.data, s3_endpoint=cfg.s3_endpoint)
    classes, source_classes = resolve_classes(cfg, source.classes)
    positive = _positive_class(cfg, classes)
    preprocessing = new_card(name="x", arch=cfg.arch, classes=classes, image_size=cfg.resolved_image_size,
                             normalization=cfg.normalization or "fixed").preprocessing
    initial_state, init_report = initial_weights(cfg, classes, source_classes)

    frame = source.frame.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)  # blocks in random order
    frame = label_frame(frame, classes)
    log(f"decoding {len(frame)} images at {preprocessing['image_size']} px (Ray Data, cached once)", cfg)
    decoded, meta = decode_dataset(frame, dict(preprocessing), s3_endpoint=cfg.s3_endpoint,
                                   pseudonym_key=grouping_key(cfg.pseudonym_key_env))
    table = frame.merge(meta, on="row_id", how="left")
    undecodable = undecodable_report(table[table["status"] != "ok"])
    table = table[table["status"] == "ok"].copy()
    table["group"], group_report = patient_groups(table)
    if undecodable["count"]:
        log(f"left out {undecodable['count']} undecodable file(s): {undecodable['by_code']}", cfg)
    if table.empty:
        raise UsageError(f"{cfg.data}: none of the {len(frame)} files could be decoded ({undecodable['by_code']})")
    report = {
        "listing": source.report,
        "undecodable": undecodable,
        "patients": group_report,
        "decoded": int(len(table)),
        "decode_seconds": round(time.perf_counter() - started, 2),
    }
    return Prepared(classes=classes, positive_class=positive, preprocessing=preprocessing, table=table,
                    decoded=decoded, report=report, initial_state=initial_state, init_report=init_report,
                    source_classes=source_classes)


def split_sizes(table: pd.DataFrame, column: str, classes: list[str]) -> dict[str, Any]:
    out = {}
    for name, part in table.groupby(column, sort=True):
        out[str(name)] = {
            "images": int(len(part)),
            "patients": int(part["group"].nunique()),
            "per_class": {c: int((part["label"] == i).sum()) for i, c in enumerate(classes)},
        }
    return out
