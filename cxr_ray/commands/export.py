"""``cxr-ray export``: write a verified ONNX graph or TensorRT engine into a model artifact.

Prints one JSON object: the record stored in ``model.json`` (file, sha256,
max abs difference vs PyTorch, ...); each step (tracing, verifying, building)
shows on stderr as it starts. ``--format tensorrt`` builds for the GPU
it runs on and stores the plan under ``engines/`` keyed by compute capability,
TensorRT version, precision, batch profile and image size.
"""

from __future__ import annotations

import argparse
import json

from cxr_ray.commands.options import add_shared


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a model artifact to ONNX or a TensorRT engine (verified against PyTorch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_shared(parser, "model", model="local model artifact directory")
    parser.add_argument("--format", required=True, choices=("onnx", "tensorrt"), dest="format")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, parsed by TensorRT 10)")
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default="fp16", help="TensorRT precision (default fp16)"
    )
    parser.add_argument("--max-batch", type=_positive_int, default=32, help="TensorRT profile max batch (default 32)")
    parser.add_argument("--min-batch", type=_positive_int, default=1, help="TensorRT profile min batch (default 1)")
    parser.add_argument("--opt-batch", type=_positive_int, default=None, help="TensorRT profile opt batch (default: max)")
    parser.add_argument(
        "--calibration", metavar="MANIFEST", default=None,
        help="int8: images to calibrate on (manifest .csv/.parquet, directory or glob; a seeded sample is used)",
    )
    parser.add_argument("--calibration-images", type=_positive_int, default=512, help="int8: sample size (default 512)")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace (default 4 GiB)")
    parser.add_argument("--device", default=None, help="CUDA device for TensorRT (default cuda:0)")
    parser.add_argument("--atol", type=float, default=None,
                        help="max abs difference on probabilities vs PyTorch (default: onnx 1e-4; "
                             "tensorrt fp32 1e-3, fp16 2e-2, int8 1e-1)")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical check against PyTorch")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="ONNX exporter (dynamo needs onnxscript)")
    add_shared(parser, "s3_endpoint", s3_endpoint="S3 endpoint for an s3:// calibration manifest")
    return parser


def run(args: argparse.Namespace) -> int:
    from cxr_ray.progress import stages

    with stages(f"export {args.format}"):  # each step on stderr as it starts: tracing, verifying, building
        result = _export(args)
    print(json.dumps({"format": args.format, **result}, indent=2, sort_keys=True))
    return 0


def _export(args: argparse.Namespace) -> dict:
    from cxr_ray.errors import UsageError

    if args.format == "onnx":
        from cxr_ray.engines.onnxruntime.build import DEFAULT_ATOL, export_onnx

        result = export_onnx(
            args.model,
            opset=args.opset,
            verify=not args.no_verify,
            atol=DEFAULT_ATOL if args.atol is None else args.atol,
            exporter=args.exporter,
        )
    else:
        if args.calibration is not None and args.precision != "int8":
            raise UsageError("--calibration is only used with --precision int8")
        from cxr_ray.engines.tensorrt.build import export_tensorrt

        result = export_tensorrt(
            args.model,
            precision=args.precision,
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            calibration=args.calibration,
            calibration_limit=args.calibration_images,
            workspace_gb=args.workspace_gb,
            opset=args.opset,
            atol=args.atol,
            verify=not args.no_verify,
            device=args.device,
            s3_endpoint=args.s3_endpoint,
        )
    return result
