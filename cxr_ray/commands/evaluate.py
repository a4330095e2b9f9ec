"""``cxr-ray evaluate``: metrics of a model artifact on a labelled set, at its own threshold.

Writes OUT/metrics.json (``report`` = cxr_ray.evaluate.classification_report
of the predictions, plus model and data details), OUT/predictions.csv (one
row per decoded image: path, label, prob_<class>, predicted_label, score,
flagged), OUT/roc.png and OUT/confusion.png. The operating threshold is the
artifact's (chosen on validation data when it was trained). Undecodable files
are counted by error code and left out. JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics + plots of a model artifact on a labelled set (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="ARTIFACT", help="model artifact directory (local or s3://)")
    parser.add_argument("--data", required=True, metavar="LABELS_OR_DIR",
                        help="folder tree root/<class>/<image> or a .csv/.parquet manifest path,label[,patient_id]")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (local or s3://)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--use-gpu", action="store_true", help="predict on a GPU")
    parser.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    parser.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.commands.train import connect, quiet_ray_data
    from cxr_ray.train.evaluation import evaluate_artifact

    connect(args.address)
    quiet_ray_data()
    summary = evaluate_artifact(args.model, args.data, args.out, s3_endpoint=args.s3_endpoint,
                                n_bootstrap=args.n_bootstrap, seed=args.seed, use_gpu=args.use_gpu,
                                batch_size=args.batch_size)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
