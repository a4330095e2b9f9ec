"""``cxr-ray serve``: the HTTP endpoint on Ray Serve, until Ctrl-C.

The same application ``serve run deploy/serve.yaml`` starts, with its arguments
taken from flags. Prints one JSON line (URL, docs, curl examples) once the
endpoint answers.
"""

from __future__ import annotations

import argparse
import json
import os

from cxr_ray.commands.foreground import wait_until_stopped
from cxr_ray.commands.options import add_engine_options, add_shared
from cxr_ray.engines.registry import BACKEND_NAMES, PRECISION_NAMES
from cxr_ray.engines.request import engine_options
from cxr_ray.errors import UsageError
from cxr_ray.io.gpu.mode import DECODE_MODES

APP_NAME = "cxr-ray"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="HTTP endpoint (Ray Serve): POST an X-ray to /v1/predict",
        description=(
            "Serve one model artifact over HTTP with dynamic batching: POST /v1/predict, "
            "GET /v1/model, GET /healthz, OpenAPI at /docs. Runs until Ctrl-C."
        ),
    )
    add_shared(parser, "model")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--backend", default="auto", choices=BACKEND_NAMES, help="inference backend"
    )
    parser.add_argument("--device", default=None, help="backend device, e.g. cuda:0 (default: the backend's choice)")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISION_NAMES,
        help="auto: fp16 on GPUs, fp32 on CPUs; bf16: opt-in on CPUs with AVX512-BF16 / AMX (torch, checked vs fp32)",
    )
    parser.add_argument("--tta", type=int, default=1, metavar="N",
                        help="test-time augmentation: mean over N fixed views per image (default 1 = off)")
    parser.add_argument(
        "--decode", default="auto", choices=DECODE_MODES,
        help="where requests are decoded: gpu (nvImageCodec on the model's GPU, fused topology; inputs it cannot "
        "take fall back to the CPU with the reason in warnings), cpu, auto (gpu where the model runs on a GPU)",
    )
    parser.add_argument(
        "--api-key-env", default=None, metavar="VAR",
        help="require the header X-API-Key equal to the value of this environment variable",
    )
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest accepted body (default 64 MB)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: largest batch (default 16)")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=0.0,
        help="dynamic batching: longest wait to fill a batch (default 0: batch what queued during the last one)"
    )
    parser.add_argument("--no-batching", action="store_true", help="predict each request on its own")
    parser.add_argument(
        "--topology", default="fused", choices=("fused", "split"),
        help="fused (default): each replica decodes and predicts, one hop per request (CPU nodes, one machine); "
        "split: decoding replicas in front of model replicas (GPU clusters)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (fixed; default 1)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (default 0)")
    add_shared(parser, "s3_endpoint", "address",
               address="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started for this command)")
    add_engine_options(parser)


def build_args(args: argparse.Namespace):
    """Flags -> :class:`ServeArgs` (the same model ``deploy/serve.yaml`` fills)."""
    from pydantic import ValidationError

    from cxr_ray.serve.config import DeploymentArgs, ServeArgs

    if args.api_key_env and not args.address and not os.environ.get(args.api_key_env):
        raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    try:
        fused = args.topology == "fused"
        model_options = {"num_cpus": 1}
        predictor_ongoing = max(32, 2 * args.max_batch_size)  # a batch fills while one runs
        if args.gpus_per_replica:
            model_options["num_gpus"] = args.gpus_per_replica
        return ServeArgs(
            model=args.model,
            backend=args.backend,
            precision=args.precision,
            tta=args.tta,
            **engine_options(args),
            device=args.device,
            decode=args.decode,
            s3_endpoint=args.s3_endpoint,
            api_key_env=args.api_key_env,
            max_body_mb=args.max_body_mb,
            batching=not args.no_batching,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
            # The key is read from the environment of the ingress replica: a local Ray
            # started here inherits this shell's; on a cluster (--address) the variable
            # must be set on its nodes (e.g. from a Kubernetes Secret), never in a config.
            topology=args.topology,
            # fused: these replicas hold the model too (its resources, one per model replica).
            ingress=DeploymentArgs(
                num_replicas=args.replicas if fused else 1,
                max_ongoing_requests=predictor_ongoing * (1 if fused else args.replicas) + 64, max_queued_requests=64,
                ray_actor_options=model_options if fused else {"num_cpus": 0.5},
            ),
            predictor=DeploymentArgs(
                num_replicas=args.replicas, max_ongoing_requests=predictor_ongoing,
                max_queued_requests=32, ray_actor_options=model_options,
            ),
        )
    except ValidationError as exc:
        raise UsageError(str(exc)) from None


def curl_examples(url: str, api_key_env: str | None = None) -> list[str]:
    key = f' -H "X-API-Key: ${api_key_env}"' if api_key_env else ""
    return [
        f"curl -s{key} -H 'Content-Type: image/png' --data-binary @chest.png {url}/v1/predict",
        f"curl -s{key} -H 'Content-Type: application/dicom' --data-binary @image.dcm '{url}/v1/predict?explain=gradcam'",
        f"curl -s{key} -F file=@chest.jpg {url}/v1/predict",
        f"curl -s{key} {url}/v1/model",
        f"curl -s {url}/healthz",
    ]


def run(args: argparse.Namespace) -> int:
    serve_args = build_args(args)
    import torch

    from cxr_ray.engines.preflight import check_engine
    from cxr_ray.models.artifact import verify_artifact

    # fail here, not in every replica in turn: a broken artifact, an engine this machine cannot run
    verify_artifact(serve_args.model, serve_args.s3_endpoint)
    if args.gpus_per_replica and not args.address and not torch.cuda.device_count():
        raise UsageError(f"--gpus-per-replica {args.gpus_per_replica:g}: no CUDA GPU is visible here, so the "
                         "replicas would wait for one forever; drop the flag or pass --address of a GPU cluster")
    check_engine(serve_args.backend, serve_args.precision, gpus=args.gpus_per_replica, device=args.device,
                 local=not (args.address or os.environ.get("RAY_ADDRESS")), calibration=serve_args.calibration)

    import ray
    from ray import serve

    from cxr_ray.serve.app import app_builder

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app_builder(serve_args), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    print(json.dumps({"url": url, "docs": f"{url}/docs", "app": APP_NAME, "curl": curl_examples(url, args.api_key_env)}),
          flush=True)
    try:
        wait_until_stopped()
    finally:  # also when the wait itself is interrupted: Serve and Ray stop cleanly
        serve.shutdown()
        ray.shutdown()
    return 0
