"""``cxr-ray bench train``: training images/s of the Ray Train loop against a plain PyTorch loop.

Both loops train the same architecture on the same images (a phantom archive
decoded and preprocessed once, in this process) with the same optimizer, the
same step function (:func:`cxr_ray.train.steps.train_one_epoch`: AMP +
channels_last on GPU) and the same batch size, for the same number of steps
after the same warm-up steps:

* *plain*: a ``torch.utils.data.DataLoader`` over in-memory tensors, run as a
  plain Ray task with the CPUs (torch threads) or GPU of one Ray Train worker,
  so that both loops run in the same kind of process;
* *ray_train*: ``TorchTrainer`` workers reading their shard of a materialized
  Ray Data dataset through ``get_dataset_shard().iter_torch_batches()`` (the
  ingest path of ``cxr-ray train``), DDP when ``--num-workers`` > 1.

The clock is wall time (``time.perf_counter``) around the timed steps only,
measured where the steps run (rank 0 for Ray Train): start-up (worker
processes, process group, dataset split) is reported separately as
``fit_wall_s``. ``ratio`` = ray_train / plain images/s; with one worker it is
the cost of the Ray Train ingest and loop, with N workers it also shows the
scaling. The plain loop runs before and after the Ray Train run; its figure
is the mean of the two (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxr_ray.data.labelled import decode_batch
from cxr_ray.errors import UsageError
from cxr_ray.models.build import build_model
from cxr_ray.models.registry import get_arch
from cxr_ray.preprocess import PreprocessConfig
from cxr_ray.progress import stage
from cxr_ray.ray_session import connect, quiet_ray_data
from cxr_ray.synth import generate_archive
from cxr_ray.train.steps import amp_settings, train_one_epoch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="training images/s: Ray Train loop vs a plain PyTorch loop, same data and model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", required=True, help="architecture name (see cxr-ray train --help)")
    parser.add_argument("--image-size", type=int, default=128, help="square input size (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step per worker (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--images", type=int, default=None, help="phantom images in the set (default: 4 x batch x workers)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker, and for the plain loop")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs (= torch threads) per Ray worker and for the plain loop (default: 1 with GPUs, else CPUs / workers)")
    parser.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    connect(args.address)
    quiet_ray_data()
    result = bench_train(args.arch, image_size=args.image_size, batch_size=args.batch_size, steps=args.steps,
                         warmup_steps=args.warmup_steps, images=args.images, num_workers=args.num_workers,
                         use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker)
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- data


def _phantom_tensors(n: int, image_size: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(images (n, 1, S, S) preprocessed, labels, mean, std) of a fresh phantom archive."""

    config = PreprocessConfig(image_size=image_size)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-train-") as root:
        labels = generate_archive(root, n=n, formats=("png",), seed=0, size=max(64, image_size))
        decoded = decode_batch(
            {"row_id": np.arange(len(labels)), "path": np.array([os.path.join(root, p) for p in labels["path"]]),
             "label": np.zeros(len(labels), dtype=np.int64)},
            preprocessing=config.to_dict(),
        )
    classes = sorted(labels["label"].unique())
    y = labels["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return decoded["image"], y, config.mean, config.std


# --------------------------------------------------------------------------- the two loops


def _timed(model, batches, device, steps: int, warmup: int, lr: float) -> tuple[float, int]:
    """Run ``warmup`` then ``steps`` steps of train_one_epoch; (seconds, images) of the timed part."""

    amp_dtype, needs_scaler = amp_settings(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    criterion = nn.CrossEntropyLoss()
    train_one_epoch(model, islice(batches, warmup), criterion, optimizer, scheduler, scaler, device, amp_dtype=amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = train_one_epoch(model, islice(batches, steps), criterion, optimizer, scheduler, scaler, device,
                            amp_dtype=amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stats["seconds"], stats["n"]


def _plain_loop(arch: str, images: np.ndarray, labels: np.ndarray, *, batch_size: int, steps: int, warmup: int,
                use_gpu: bool, threads: int) -> dict:

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        device = torch.device("cuda" if use_gpu else "cpu")
        model = build_model(arch, int(labels.max()) + 1).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model.train()
        loader = DataLoader(TensorDataset(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels))),
                            batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=use_gpu)

        def batches():
            while True:
                for image, label in loader:
                    yield {"image": image, "label": label}

        seconds, seen = _timed(model, batches(), device, steps, warmup, 1e-3)
    finally:
        torch.set_num_threads(saved_threads)
    return {"images_per_s": round(seen / seconds, 2), "seconds": round(seconds, 3), "images": seen}


def _ray_worker(config: dict) -> None:
    """The Ray Train side: same step function, data from this worker's Ray Data shard."""

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    context = ray.train.get_context()  # RAY
    model = build_model(config["arch"], config["num_classes"])
    device = ray.train.torch.get_device()  # RAY
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # RAY: device + DDP
    model.train()
    shard = ray.train.get_dataset_shard("train")  # RAY

    def batches():
        while True:
            yield from shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=True, device="cpu")

    seconds, seen = _timed(model, batches(), device, config["steps"], config["warmup"], 1e-3)
    world = context.get_world_size()
    metrics = {"seconds": seconds, "images": seen * world, "images_per_s": seen * world / seconds}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if context.get_world_rank() == 0:  # Ray Train keeps metrics only with a checkpoint
            with open(os.path.join(directory, "bench.json"), "w") as handle:
                json.dump(metrics, handle)
            checkpoint = ray.train.Checkpoint.from_directory(directory)  # RAY
        ray.train.report(metrics, checkpoint=checkpoint)  # RAY


def _ray_loop(arch: str, images: np.ndarray, labels: np.ndarray, *, batch_size: int, steps: int, warmup: int,
              num_workers: int, use_gpu: bool, cpus: float) -> dict:
    dataset = ray.data.from_items(
        [{"image": images[i], "label": int(labels[i])} for i in range(len(labels))]
    ).materialize()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-train-runs-") as storage:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"arch": arch, "num_classes": int(labels.max()) + 1, "batch_size": batch_size,
                               "steps": steps, "warmup": warmup, "threads": max(1, int(cpus))},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"bench-train-{int(time.time())}", storage_path=storage),
            datasets={"train": dataset},
        )
        started = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - started
    metrics = result.metrics
    return {"images_per_s": round(metrics["images_per_s"], 2), "seconds": round(metrics["seconds"], 3),  # type: ignore[index]
            "images": int(metrics["images"]), "fit_wall_s": round(wall, 2)}  # type: ignore[index]


# --------------------------------------------------------------------------- the benchmark


def bench_train(
    arch: str,
    *,
    image_size: int = 128,
    batch_size: int = 32,
    steps: int = 20,
    warmup_steps: int = 3,
    images: int | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
) -> dict:
    """Run both loops; returns the JSON-ready result (see the module docstring)."""

    try:
        spec = get_arch(arch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if image_size < spec.min_image_size:
        raise UsageError(f"--image-size {image_size}: {arch} needs at least {spec.min_image_size}")
    for name, value in (("--batch-size", batch_size), ("--steps", steps), ("--num-workers", num_workers)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if batch_size < 2:
        raise UsageError("--batch-size must be >= 2 (BatchNorm)")
    if use_gpu and not torch.cuda.is_available():
        raise UsageError("--use-gpu: no CUDA GPU is visible to this process")
    n = images or 4 * batch_size * num_workers
    if n < batch_size * num_workers:
        raise UsageError(f"--images {n} is less than one batch per worker ({batch_size} x {num_workers})")
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    cpus = cpus_per_worker or (1.0 if use_gpu else max(1.0, total_cpus // num_workers))
    threads = max(1, int(cpus))

    started = time.perf_counter()
    x, y, _, _ = _phantom_tensors(n, image_size)
    prepare_s = time.perf_counter() - started
    common = {"batch_size": batch_size, "steps": steps, "warmup": warmup_steps}
    # The plain loop runs in a Ray worker process with the resources of one Ray Train worker, so
    # both loops see the same process set-up (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES); no Ray
    # Train, no Ray Data inside it. (In the driver, OpenMP threads can behave very differently.)
    plain = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(_plain_loop)  # type: ignore[arg-type]
    x_ref, y_ref = ray.put(x), ray.put(y)
    stage(f"plain PyTorch loop ({steps} steps of {batch_size}), before")
    plain_before = ray.get(plain.remote(arch, x_ref, y_ref, use_gpu=use_gpu, threads=threads, **common))  # type: ignore[call-arg]
    stage(f"Ray Train loop ({steps} steps of {batch_size} x {num_workers} workers)")
    ray_train = _ray_loop(arch, x, y, num_workers=num_workers, use_gpu=use_gpu, cpus=cpus, **common)
    stage(f"plain PyTorch loop ({steps} steps of {batch_size}), after")
    plain_after = ray.get(plain.remote(arch, x_ref, y_ref, use_gpu=use_gpu, threads=threads, **common))  # type: ignore[call-arg]
    plain_rate = (plain_before["images_per_s"] + plain_after["images_per_s"]) / 2
    return {
        "bench": "train",
        "arch": arch,
        "image_size": image_size,
        "batch_size_per_worker": batch_size,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "images_in_set": int(len(y)),
        "num_workers": num_workers,
        "device": "cuda" if use_gpu else "cpu",
        "threads_per_loop": threads,
        "clock": "time.perf_counter around the timed steps only, where they run (rank 0 for Ray Train)",
        "plain": {"images_per_s": round(plain_rate, 2), "before": plain_before, "after": plain_after,
                  "loader": "torch DataLoader over in-memory tensors (in a plain Ray task, same resources)"},
        "ray_train": {**ray_train, "loader": "Ray Data shard: get_dataset_shard().iter_torch_batches()"},
        "ratio": round(ray_train["images_per_s"] / plain_rate, 3) if plain_rate else None,
        "prepare_s": round(prepare_s, 2),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                        "cpu_count": os.cpu_count(), "cluster_cpus": total_cpus,
                        "gpu": torch.cuda.get_device_name(0) if use_gpu else None},
    }
