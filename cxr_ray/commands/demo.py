"""``cxr-ray demo``: the whole product on the embedded default, in a few minutes.

Local Ray, local files, generated phantom data: synth an archive (with corrupt
files) -> train a small model on Ray Train -> export ONNX -> screen the archive
to Parquet on Ray Data -> query the same model over HTTP on Ray Serve. Each
stage prints a progress line to stderr; the final summary is JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from cxr_ray.commands.options import add_shared
from cxr_ray.console import is_verbose, ray_init_kwargs

STAGES = 6


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on local Ray with phantom data (synth, train, export, screen, serve)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo-output", help="working directory (default ./demo-output)")
    parser.add_argument("--n", type=int, default=300, help="phantom images to generate (default 300)")
    # resnet18 at 64 px learns the phantom patterns from scratch in a minute or two on
    # 2 CPU cores; the papers' architectures (densenet121, ...) need a GPU or patience.
    parser.add_argument("--arch", default="resnet18", help="architecture to train (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="training/screening input size (default 64)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port for the Serve query (default: a free one)")
    add_shared(parser, "address", address="Ray cluster address (default: a fresh local Ray)")


def _stage(number: int, text: str) -> float:
    print(f"[{number}/{STAGES}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _done(started: float, text: str) -> None:
    print(f"      {text} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _query_endpoint(model_dir: Path, image: Path, port: int) -> dict:
    """Start the Serve app from the artifact, POST one X-ray, shut the app down."""
    import httpx
    from ray import serve

    from cxr_ray.serve.app import app_builder
    from cxr_ray.serve.config import ServeArgs

    if not is_verbose():  # after importing ray.serve, which sets its logger up; the stage lines say it once
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder(ServeArgs(model=str(model_dir))), name="cxr-ray-demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/predict?explain=gradcam"
        response = httpx.post(url, content=image.read_bytes(), headers={"Content-Type": "image/png"}, timeout=120)
        response.raise_for_status()
        body = response.json()
        heatmap = body.pop("heatmap_png_base64", None)
        body["heatmap_png_base64_chars"] = len(heatmap or "")
        return {"url": url, "status": response.status_code, "response": body}
    finally:
        serve.shutdown()


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import ray

    from cxr_ray.engines.onnxruntime.build import export_onnx
    from cxr_ray.screen.config import ScreenConfig
    from cxr_ray.screen.job import run_screen
    from cxr_ray.synth import generate_archive
    from cxr_ray.train.config import TrainConfig
    from cxr_ray.train.protocols import train

    # Ray's own processes print to this process's stdout (e.g. at Serve shutdown): send
    # everything to stderr while the demo runs, so stdout carries only the final JSON.
    json_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    out = Path(args.out).resolve()
    archive, model_dir, screen_dir = out / "archive", out / "model", out / "screen"
    began = time.perf_counter()
    if args.address:
        ray.init(address=args.address, **ray_init_kwargs(local=False))
    else:  # embedded: a fresh local Ray, even if some other cluster runs on this machine
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **ray_init_kwargs(local=True))

    t = _stage(1, f"synth: {args.n} phantom chest X-rays (DICOM/PNG/JPEG, 5% corrupt) -> {archive}")
    labels = generate_archive(
        str(archive), n=args.n, formats="dcm,png,jpg", classes="covid,pneumonia,normal",
        corrupt_fraction=0.05, seed=0, size=256, overwrite=True,
    )
    _done(t, f"{len(labels)} files, {int(labels['corrupt'].sum())} corrupt")

    t = _stage(2, f"train: {args.arch} from scratch at {args.image_size} px, {args.epochs} epochs on Ray Train")
    training = train(TrainConfig(
        data=str(archive / "labels.csv"), arch=args.arch, mode="scratch", epochs=args.epochs,
        image_size=args.image_size, out=str(model_dir), storage_path=str(out / "train-runs"),
        run_name="demo", patience=0, n_bootstrap=200, seed=0, quiet=True,
    ))
    test_metrics = training.get("test") or training.get("metrics") or {}
    _done(t, f"artifact {model_dir}; test accuracy {test_metrics.get('accuracy')}")

    t = _stage(3, "export: ONNX, verified against PyTorch with ONNX Runtime")
    onnx_record = export_onnx(model_dir)
    _done(t, f"max |onnx - torch| = {onnx_record.get('max_abs_diff')}")

    manifest = archive / "labels.csv"  # the X-rays (corrupt files included), not the lesion masks beside them
    t = _stage(4, f"screen: Ray Data over {manifest} -> Parquet in {screen_dir}")
    summary = run_screen(ScreenConfig(model=str(model_dir), inputs=[str(manifest)], output=str(screen_dir)))
    _done(t, f"{summary['rows']} rows for {summary['inputs']} inputs; status {summary['status']}; "
             f"{summary['flagged']} flagged")

    t = _stage(5, "serve: Ray Serve endpoint, one POST /v1/predict?explain=gradcam")
    sample = archive / labels.loc[(labels["format"] == "png") & ~labels["corrupt"], "path"].iloc[0]
    query = _query_endpoint(model_dir, sample, args.port or _free_port())
    _done(t, f"HTTP {query['status']}: {query['response'].get('label')} score {query['response'].get('score')}")

    t = _stage(6, "read the Parquet back with pandas")
    frame = pd.read_parquet(screen_dir)
    _done(t, f"{len(frame)} rows x {frame.shape[1]} columns")
    ray.shutdown()

    json_out.write(json.dumps({
        "seconds": round(time.perf_counter() - began, 1),
        "archive": str(archive),
        "model": str(model_dir),
        "training": {"test": test_metrics, "seconds": training.get("seconds")},
        "onnx": onnx_record,
        "screen_output": str(screen_dir),
        "screen_summary": summary,
        "serve_query": query,
        "open_with": f"python -c \"import pandas as pd; print(pd.read_parquet('{screen_dir}').head())\"",
    }, indent=2, default=str) + "\n")
    json_out.flush()
    return 0
