"""``cxr-ray evaluate``: metrics of a model artifact on a labelled set, at its own threshold.

Writes OUT/metrics.json (``report`` = cxr_ray.evaluate.classification_report
of the predictions, plus model and data details), OUT/predictions.csv (one
row per decoded image: path, label, prob_<class>, predicted_label, score,
flagged), OUT/roc.png, OUT/confusion.png and OUT/reliability.png. The
probabilities are the artifact's calibrated ones and the operating threshold
is the artifact's (both fitted on validation data when it was trained).
Confidence intervals resample patients (manifest patient_id, else DICOM
PatientID pseudonyms). --group-by COLUMN adds per-group figures (sources,
views, sexes...). Undecodable files are counted by error code and left out.
JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json

from cxr_ray.commands.options import add_shared
from cxr_ray.ray_session import connect, quiet_ray_data


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics + plots of a model artifact on a labelled set (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_shared(parser, "model")
    parser.add_argument("--data", required=True, metavar="LABELS_OR_DIR",
                        help="folder tree root/<class>/<image> or a .csv/.parquet manifest path,label[,patient_id]")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (local or s3://)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--use-gpu", action="store_true", help="predict on a GPU")
    parser.add_argument("--group-by", action="append", default=None, metavar="COLUMN",
                        help="also report per value of this manifest column (e.g. source, view, sex; repeatable): "
                        "sensitivity / specificity / AUC with patient-level CIs")
    parser.add_argument("--tta", type=int, default=1, metavar="N",
                        help="test-time augmentation: mean over N fixed views per image (default 1 = off)")
    add_shared(parser, "s3_endpoint", "address")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.train.evaluation import evaluate_artifact  # the surface: loaded when the verb runs

    connect(args.address)
    quiet_ray_data()
    summary = evaluate_artifact(args.model, args.data, args.out, s3_endpoint=args.s3_endpoint,
                                n_bootstrap=args.n_bootstrap, seed=args.seed, use_gpu=args.use_gpu,
                                batch_size=args.batch_size, group_by=args.group_by, tta=args.tta)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
