"""``cxr-ray bench gpu`` (or ``python -m cxr_ray.bench.gpu``): the GPU path measured, in one go, without Ray.

For a bare GPU machine that has torch with CUDA and nothing to install from: it uses the project's
own parts directly (:func:`~cxr_ray.engines.load.load_backend`, the screening predict stage as a
plain object, :class:`~cxr_ray.io.gpu.decode.GpuDecoder`) and prints ONE JSON document:

* ``device``: the GPU (or CPU) and the software found;
* ``engines``: images/s of torch CUDA fp32 (NCHW and channels_last), fp16 autocast, fp16 with CUDA
  graphs (and ``--compile``), ONNX Runtime's CUDA / TensorRT providers and TensorRT where installed,
  at each ``--batch-sizes``, each with its max |difference| from CPU fp32 probabilities;
* ``decode``: GPU decode files/s against one CPU core on the same files (phantom JPEG 2000, JPEG
  and HTJ2K DICOMs rendered here at ``--phantom-size``, and the real files under ``--input``);
* ``end_to_end``: decode -> model images/s of the predict stage on those files, GPU and CPU decode;
* ``targets``: the issue's H100 targets, true / false, or null where not measured or not an H100.

``--device cpu`` is a dry run of the same code on the CPU (Pillow stands in for nvImageCodec): it
checks the script, the figures are no GPU figures. ``scripts/device-check.sh`` runs this on the
device machine with the wheels of ``scripts/build-device-wheels.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from cxr_ray.bench.artifacts import random_artifact
from cxr_ray.bench.gpu_decode import decode_rates, end_to_end, make_decoder
from cxr_ray.bench.gpu_engines import engine_rows
from cxr_ray.bench.gpu_inputs import phantom_dicoms, real_files, repeat, write_inputs
from cxr_ray.errors import UsageError
from cxr_ray.io.gpu.mode import nvimgcodec_available
from cxr_ray.models.artifact import load_card
from cxr_ray.optional import available
from cxr_ray.progress import stage

SCHEMA_VERSION = 1
DEFAULT_BATCH_SIZES = "1,32,128,256"
TARGETS_FOR = "H100"
DEFAULT_INPUT = Path(os.environ.get("CXR_RAY_REAL_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"))


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("gpu", help="the GPU path measured without Ray: engines, GPU decode, end to end",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the same code)")
    parser.add_argument("--arch", default="densenet121", help="architecture, random weights (default densenet121)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--batch-sizes", type=_sizes, default=_sizes(DEFAULT_BATCH_SIZES),
                        help=f"engine batch sizes (default {DEFAULT_BATCH_SIZES})")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per engine and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes per shape)")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="real DICOM / PNG / JPEG files")
    parser.add_argument("--real-limit", type=int, default=64, help="at most this many real files")
    parser.add_argument("--phantoms", type=int, default=8, help="distinct phantom chests per DICOM syntax")
    parser.add_argument("--phantom-size", type=int, default=1280, help="phantom image height (default 1280)")
    parser.add_argument("--decode-files", type=int, default=256, help="inputs per decode set (repeated)")
    parser.add_argument("--decode-batch", type=int, default=64, help="files per GPU decode call")
    parser.add_argument("--e2e-files", type=int, default=1024, help="inputs of the end-to-end run")
    parser.add_argument("--e2e-batch", type=int, default=128, help="predict-stage batch size")
    parser.add_argument("--rounds", type=int, default=2, help="decode rounds; the fastest counts")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    return parser


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "requested": device, "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "nvimgcodec_installed": nvimgcodec_available(),
        "tensorrt_installed": available("tensorrt"), "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(kind="cuda", name=torch.cuda.get_device_name(dev), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(kind="cpu", name=platform.processor() or platform.machine())
    return info


def _row(rows: list[dict[str, Any]], variant: str, size: int) -> float | None:
    found = [r.get("images_per_s") for r in rows if r["variant"] == variant and r["batch_size"] == size]
    return found[0] if found else None


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's H100 targets; null where the figure is missing or the device is no H100."""
    if TARGETS_FOR not in str(report["device"].get("name", "")):
        return {"evaluated": False, "reason": f"the targets are for an {TARGETS_FOR}; this is {report['device'].get('name')}"}
    rows = report["engines"]["rows"]
    fp16 = max(filter(None, [_row(rows, "torch-cuda-fp16-cl", 128), _row(rows, "torch-cuda-fp16-cl-graphs", 128)]),
               default=None)
    fp32 = _row(rows, "torch-cuda-fp32-cl", 128)
    decode = [s["ratio_gpu_vs_one_core"] for name, s in report["decode"]["sets"].items() if name.startswith("phantom")]
    e2e = report["end_to_end"].get("gpu_decode", {}).get("images_per_s")

    def check(value: float | None, bound: float) -> bool | None:
        return None if value is None else bool(value >= bound)

    return {
        "evaluated": True,
        "densenet121_fp16_b128_ge_4000": check(fp16, 4000),
        "fp16_ge_2x_fp32_b128": None if fp16 is None or fp32 is None else bool(fp16 >= 2 * fp32),
        "gpu_decode_phantom_ge_10x_one_core": None if not decode else bool(min(decode) >= 10),
        "end_to_end_ge_1500": check(e2e, 1500),
    }


def _decode_sets(args: argparse.Namespace) -> tuple[dict[str, tuple[list[bytes], int]], dict[str, Any]]:
    phantoms, skipped = phantom_dicoms(args.phantoms, args.phantom_size)
    sets = {f"phantom_{kind}_dicom": (repeat(files, args.decode_files), len(files)) for kind, files in phantoms.items()}
    real, found = real_files(args.input, args.real_limit)
    if real:
        sets["real_files"] = (repeat(real, args.decode_files), len(real))
    return sets, {"phantom_size": args.phantom_size, "phantoms_not_written": skipped, "real": found}


def _section(report: dict[str, Any], key: str, compute: Any, saved: Any = None) -> Any:
    """``report[key] = compute()``; a failure is recorded there (the one JSON document still comes out).
    ``saved``: called after each section, so a run stopped by its time limit keeps what it measured."""
    stage(f"measuring {key}")
    try:
        report[key] = compute()
    except Exception as exc:  # noqa: BLE001 - a broken section must not cost the others' figures
        report[key] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if saved is not None:
        saved()
    return report[key]


def _decode_section(args: argparse.Namespace, device: str, card: Any, sets: dict) -> dict[str, Any]:
    decoder = make_decoder(device, card.image_size)
    rates = decode_rates(sets, decoder, card.preprocess_config, batch=args.decode_batch, rounds=args.rounds)
    return {"codec": decoder.codec.name, "codec_version": getattr(decoder.codec, "version", None), "sets": rates}


def run_check(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    """Everything, in order; returns the report (``save(report)`` after each section, if given)."""
    started = time.perf_counter()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here (use --device cpu for a dry run)")
    report: dict[str, Any] = {"bench": "gpu", "schema_version": SCHEMA_VERSION, "device": device_info(device),
                              "measured_on_gpu": device.startswith("cuda"), "complete": False}

    def saved() -> None:
        if save is not None:
            report["elapsed_s"] = round(time.perf_counter() - started, 1)
            save(report)

    with tempfile.TemporaryDirectory(prefix="cxr-bench-gpu-") as tmp:
        artifact = random_artifact(Path(tmp) / "model", args.arch, args.image_size)
        card = load_card(artifact)
        report["model"] = {"arch": card.arch, "image_size": card.image_size, "weights": "random (seeded)"}
        report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        _section(report, "engines", lambda: engine_rows(artifact, device, args.batch_sizes, card.image_size,
                                                        seconds=args.seconds, warmup=args.warmup, compile=args.compile),
                 saved)
        sets, inputs = _decode_sets(args)
        report["inputs"] = inputs
        _section(report, "decode", lambda: _decode_section(args, device, card, sets), saved)
        distinct = [f for files, n in sets.values() for f in files[:n]]
        paths = write_inputs(Path(tmp) / "inputs", repeat(distinct, args.e2e_files))
        report["end_to_end"] = {}
        for mode in ("gpu", "cpu"):
            _section(report["end_to_end"], f"{mode}_decode",
                     lambda mode=mode: end_to_end(paths, artifact, device, mode, args.e2e_batch), saved)
    _section(report, "targets", lambda: targets(report))
    report["complete"] = True
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _writer(path: Path | None) -> Any:
    def write(report: dict[str, Any]) -> None:
        if path is not None:
            path.write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    return write


def run(args: argparse.Namespace) -> int:
    write = _writer(args.output)
    report = run_check(args, write)
    write(report)
    print(json.dumps(report, indent=2, default=_plain))
    sys.stdout.flush()
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_ray.bench.gpu")
    suites = parser.add_subparsers(dest="suite", required=True)
    add_parser(suites)
    return run(parser.parse_args(["gpu", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
