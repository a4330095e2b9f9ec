"""Objective check of the heatmaps: train on a phantom archive, score against its lesion masks.

The phantom (``cxr_ray.synth``) draws the lesions itself, so it knows where
they are: a model that has learnt covid / pneumonia from them should put its
heatmap on them. This module trains a small model in plain PyTorch (no Ray:
it is a check of the explanation methods, not of the training system), then
prints :func:`~cxr_ray.explain.localisation.localisation_report` per
architecture as JSON::

    python -m cxr_ray.explain.phantom_check --archs densenet121,mobilenet_v2 --size 96 --epochs 4

Use ``--train-labels`` / ``--eval-labels`` to score existing archives instead
of generating new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr_ray.errors import DecodeError
from cxr_ray.explain.localisation import localisation_report
from cxr_ray.explain.methods import default_layer
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card
from cxr_ray.models.registry import get_arch
from cxr_ray.preprocess import preprocess
from cxr_ray.synth import generate_archive

PHANTOM_CLASSES = ("covid", "normal", "pneumonia")


def report_methods(arch: str) -> list[str]:
    """What the check scores for ``arch``: Grad-CAM (registry layer, and the registry's finer one:
    6 x 6 cells at 96 px where a stride-32 layer has 3 x 3), LRP if supported."""
    spec = get_arch(arch)
    methods = ["gradcam"]
    if spec.finer_gradcam_layer:
        methods.append(f"gradcam@{spec.finer_gradcam_layer}")
    if spec.supports_lrp:
        methods.append("lrp")
        first_conv = spec.first_conv
        if default_layer(arch, "lrp") != first_conv:
            methods.append(f"lrp@{first_conv}")  # the pixel-level map too
    return methods


def load_archive(labels_csv: str, classes: Sequence[str], image_size: int, config) -> tuple:
    """Preprocessed tensors of every decodable, labelled image: ``(x (N,1,S,S), y (N,))``."""
    table = pd.read_csv(labels_csv, keep_default_na=False)
    base = os.path.dirname(os.path.abspath(labels_csv))
    reading = InputPolicy(target_size=image_size)
    xs, ys = [], []
    for row in table.itertuples(index=False):
        if str(getattr(row, "corrupt", "False")).lower() in ("true", "1") or row.label not in classes:
            continue
        path = row.path if os.path.isabs(row.path) else os.path.join(base, row.path)
        try:
            pixels = load_input(path, reading, name=str(row.path)).image.pixels
        except DecodeError:
            continue
        xs.append(preprocess(pixels, config))
        ys.append(list(classes).index(row.label))
    if not xs:
        raise ValueError(f"{labels_csv}: no decodable images of classes {list(classes)}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def train_phantom_model(
    labels_csv: str,
    arch: str,
    *,
    image_size: int = 128,
    classes: Sequence[str] = PHANTOM_CLASSES,
    positive_class: str = "covid",
    epochs: int = 8,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: float | None = None,
    device: str = "cpu",
):
    """A from-scratch ``arch`` trained on the archive; returns ``(model (eval, CPU), card, history)``.

    Plain Adam with a cosine learning-rate decay + cross-entropy, flips as the
    only augmentation (the phantom's lesions are left/right symmetric in
    distribution), batch-norm statistics re-estimated at the end.
    ``time_budget_s`` stops after the epoch that crosses it.
    """

    card = new_card(
        name=f"phantom-{arch}", arch=arch, classes=list(classes), image_size=image_size,
        positive_class=positive_class,
    )
    x, y = load_archive(labels_csv, classes, image_size, card.preprocess_config)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(arch, len(classes)).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = sum(1 for b in range(0, len(y), batch_size) if len(y) - b >= 2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total, correct, seen = 0.0, 0, 0
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            if len(batch) < 2:
                continue  # batch norm needs two samples
            xb, yb = x[batch].to(device), y[batch].to(device)
            flip = torch.rand(len(batch), generator=generator) < 0.5
            xb = torch.where(flip.to(device)[:, None, None, None], xb.flip(-1), xb)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(batch)
        history.append(
            {"epoch": epoch + 1, "loss": total / seen, "train_accuracy": correct / seen,
             "elapsed_s": round(time.perf_counter() - start, 1)}
        )
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
    recalibrate_batch_norm(model, x, batch_size=batch_size * 2, device=device)
    card.training = {"epochs": len(history), "lr": lr, "batch_size": batch_size, "seed": seed,
                     "history": history, "data": os.fspath(labels_csv)}
    return model.cpu().eval(), card, history


def recalibrate_batch_norm(model, x, *, batch_size: int = 32, device: str = "cpu") -> None:
    """Batch-norm statistics re-estimated over ``x`` with the final weights ("precise BN").

    The running averages otherwise mix statistics from earlier, quite different
    weights, which after a few epochs from scratch costs much eval accuracy.
    """

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for begin in range(0, len(x), batch_size):
            if len(x) - begin >= 2:
                model(x[begin : begin + batch_size].to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def accuracy(model, card, labels_csv: str) -> float:
    """Top-1 accuracy of ``model`` on an archive (eval mode, CPU)."""

    x, y = load_archive(labels_csv, card.classes, card.image_size, card.preprocess_config)
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 32]).argmax(1) for i in range(0, len(y), 32)])
    return float((predicted == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_ray.explain.phantom_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--archs", default="densenet121,mobilenet_v2:8", help="comma-separated ARCH[:EPOCHS] (default --epochs)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 = reproducible weights)")
    parser.add_argument("--n", type=int, default=300, help="training images to generate")
    parser.add_argument("--n-eval", type=int, default=90, help="held-out images to generate")
    parser.add_argument("--phantom-size", type=int, default=128, help="height of the generated images")
    parser.add_argument("--size", type=int, default=96, help="model input size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-labels", help="existing labels.csv to train on (skips generation)")
    parser.add_argument("--eval-labels", help="existing labels.csv to score on (skips generation)")
    parser.add_argument("--work-dir", help="where generated archives go (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="cxr-phantom-")
    train_labels, eval_labels = args.train_labels, args.eval_labels
    if train_labels is None or eval_labels is None:
        for name, n, seed in (("train", args.n, 1), ("eval", args.n_eval, 2)):
            out = os.path.join(work, name)
            generate_archive(out, n=n, formats=("png",), classes=PHANTOM_CLASSES, corrupt_fraction=0.0,
                             seed=seed, size=args.phantom_size)
        train_labels = train_labels or os.path.join(work, "train", "labels.csv")
        eval_labels = eval_labels or os.path.join(work, "eval", "labels.csv")

    for entry in [a.strip() for a in args.archs.split(",") if a.strip()]:
        arch, _, epochs = entry.partition(":")
        start = time.perf_counter()
        model, card, history = train_phantom_model(
            train_labels, arch, image_size=args.size, epochs=int(epochs or args.epochs), lr=args.lr,
            device=args.device,
        )
        report = localisation_report(
            model, card, eval_labels, methods=report_methods(arch), classes=["covid", "pneumonia"]
        )
        report["train_s"] = round(time.perf_counter() - start, 1)
        report["eval_accuracy"] = accuracy(model, card, eval_labels)
        report["history"] = history
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
