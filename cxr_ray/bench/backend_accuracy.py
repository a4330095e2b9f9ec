"""``cxr-ray bench backends --verify-labels SPEC``: what each engine's speed costs in accuracy, on real images.

The timing rows compare every engine with eager PyTorch on one noise batch, which
says nothing about a lower-precision engine on radiographs. With a labelled set,
every engine also predicts a seeded sample of its real images, decoded and
preprocessed as screening does, and the report gives, against ONNX Runtime fp32
on the same images (the reference the OpenVINO engines are verified against when
they load): the largest probability difference and the change in ROC AUC
(positive class vs the rest), with the limits an engine must meet to be chosen by
``--backend auto``. The figures are reported, never enforced here.
"""

from __future__ import annotations

import argparse
from typing import Any

from cxr_ray.engines.contract import tolerance
from cxr_ray.engines.openvino.runtime import OpenVinoBackend
from cxr_ray.engines.verify import (
    AUC_TOLERANCE,
    DEFAULT_VERIFY_IMAGES,
    auc,
    labelled_sample,
    predict_all,
    verify_against,
)
from cxr_ray.models.card import ModelCard
from cxr_ray.progress import stage


def accuracy_on_real_images(backends: dict[str, Any], reference_name: str, card: ModelCard, spec: str, *,
                            images: int = DEFAULT_VERIFY_IMAGES, s3_endpoint: str | None = None) -> dict[str, Any]:
    """Each backend's probability difference and AUC change vs ``reference_name`` on ``images`` of ``spec``."""
    stage(f"decoding {images} labelled images of {spec} for the accuracy check")
    sample = labelled_sample(spec, card, limit=images, s3_endpoint=s3_endpoint)
    assert sample.labels is not None  # a labelled set always has them
    reference = backends[reference_name]
    expected = predict_all(reference, sample.images)  # once, for every engine and the reference AUC
    rows: dict[str, Any] = {}
    for name, backend in backends.items():
        if name == reference_name:
            continue
        stage(f"accuracy of {name} on {len(sample.images)} real images")
        report = verify_against(backend, reference, card, atol=float("inf"), sample=sample, synthetic=False,
                                auc_tolerance=float("inf"), expected=expected)
        # the engines checked against ONNX Runtime fp32 when they load: their load-time limit
        limit = tolerance(backend.name, backend.precision) if isinstance(backend, OpenVinoBackend) else None
        change = report["auc"]["change"]
        rows[name] = {
            "max_abs_diff": round(report["max_abs_diff_real"], 6),
            "auc": report["auc"]["engine"],
            "auc_change": None if change is None else round(change, 6),
            "max_abs_diff_limit": limit,
            "within_limits": None if limit is None or change is None
            else bool(report["max_abs_diff_real"] <= limit and abs(change) <= AUC_TOLERANCE),
        }
    return {"labelled_set": spec, "images": len(sample.images), "skipped": sample.skipped,
            "reference": reference_name,
            "reference_auc": auc(expected, sample.labels, card.positive_index),
            "auc_limit": AUC_TOLERANCE, "positive_class": card.positive_class, "engines": rows}


def add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify-labels", metavar="SPEC", default=None,
                        help="labelled manifest / folder tree: also report each engine's largest probability "
                        "difference and AUC change against ONNX Runtime fp32 on its real images")
    parser.add_argument("--verify-images", type=int, default=DEFAULT_VERIFY_IMAGES,
                        help=f"with --verify-labels: seeded sample size (default {DEFAULT_VERIFY_IMAGES})")
