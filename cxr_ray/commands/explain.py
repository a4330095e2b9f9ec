"""``cxr-ray explain --model ARTIFACT INPUT... --out DIR``: Grad-CAM / LRP heatmaps per image.

Also ``cxr-ray explain --model ARTIFACT --evaluate-localisation LABELS_CSV``:
energy ratio and pointing game of the heatmaps against a phantom archive's
lesion masks, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from cxr_ray.commands.options import add_shared
from cxr_ray.errors import UsageError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM / LRP heatmaps: an overlay PNG + raw .npy per image (one JSON line each)",
        description=(
            "Explain the model's prediction for each input (files, directories, globs, s3:// "
            "prefixes, .csv/.parquet manifests): writes OUT/<name>.<method>.png (the heatmap "
            "over the X-ray, at the original image size) and OUT/<name>.<method>.npy (the "
            "float32 heatmap in [0, 1]) and prints one JSON line per input (path, status, "
            "method, class, score, files). Undecodable inputs give a JSON line with the "
            "decode error code and the run goes on. With --evaluate-localisation, scores the "
            "heatmaps against a phantom archive's lesion masks instead (energy ratio, "
            "pointing game) and prints one JSON object."
        ),
    )
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_URI", help="file, directory, glob, s3:// URI or manifest")
    add_shared(parser, "model")
    parser.add_argument(
        "--method",
        choices=("gradcam", "lrp"),
        default=None,
        help="gradcam (every architecture) or lrp (vgg19, densenet*, resnet18, resnet50); "
        "default gradcam, or every supported method with --evaluate-localisation",
    )
    parser.add_argument(
        "--layer",
        metavar="NAME",
        default=None,
        help="module path the map is read at (default: the architecture's Grad-CAM layer from "
        "the registry; for LRP the first convolution, features.transition2.pool on DenseNet, "
        "features.18 on VGG-19); "
        "e.g. features.denseblock3 for a "
        "finer Grad-CAM on small inputs",
    )
    parser.add_argument(
        "--class",
        dest="target",
        metavar="NAME",
        default=None,
        help="class to explain (default: the predicted class); with --evaluate-localisation, "
        "the lesion class to score (default: the positive class)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory or s3:// prefix (required unless evaluating)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity at the heatmap's peak (default 0.5)")
    parser.add_argument(
        "--evaluate-localisation",
        metavar="LABELS_CSV",
        default=None,
        help="score heatmaps against the lesion masks of a cxr-ray synth archive; prints JSON",
    )
    parser.add_argument("--limit", type=int, default=None, help="with --evaluate-localisation: images per class")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="with --evaluate-localisation: pointing-game tolerance as a fraction of the "
        "image's shorter side (default 0.02)",
    )
    add_shared(parser, "s3_endpoint")


def run(args: argparse.Namespace) -> int:
    from cxr_ray.models.artifact import load_model

    if args.layer and not args.method:
        raise UsageError("explain: --layer needs --method (the layer belongs to one method)")
    if args.evaluate_localisation is None:
        if not args.inputs:
            raise UsageError("explain: give at least one IMAGE_OR_URI (or --evaluate-localisation LABELS_CSV)")
        if not args.out:
            raise UsageError("explain: --out DIR is required")
    model, card = load_model(args.model, s3_endpoint=args.s3_endpoint)

    if args.evaluate_localisation is not None:
        from cxr_ray.explain.localisation import DEFAULT_TOLERANCE, localisation_report

        report = localisation_report(
            model,
            card,
            args.evaluate_localisation,
            methods=[f"{args.method}@{args.layer}" if args.layer else args.method] if args.method else None,
            classes=[args.target] if args.target else None,
            limit=args.limit,
            tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
            s3_endpoint=args.s3_endpoint,
        )
        print(json.dumps(report))
        return 0

    from cxr_ray.explain.batch import explain_inputs

    for record in explain_inputs(
        model,
        card,
        args.inputs,
        args.out,
        method=args.method or "gradcam",
        layer=args.layer,
        target=args.target,
        alpha=args.alpha,
        s3_endpoint=args.s3_endpoint,
    ):
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    return 0
