"""How a new model inherits from an old one, and which of its parameters train.

The four source papers use three training modes and two kinds of inheritance:

* ``scratch`` (Apostolopoulos et al. 2020b, MobileNetV2 from scratch): every
  parameter trains at ``lr``; the caller builds the model WITHOUT pretrained
  weights (nothing here checks that: ``scratch`` only sets the optimizer up).
* ``frozen`` (Apostolopoulos & Mpesiana, frozen features): the backbone is a
  fixed feature extractor; only the classifier head trains, and the backbone's
  BatchNorm layers keep their ImageNet running statistics (call
  :func:`set_train_mode` instead of ``model.train()``).
* ``finetune``: head at ``lr``, backbone at ``lr * backbone_lr_factor``;
  ``finetune_blocks=N`` trains only the last N backbone stages.

Inheritance from an earlier chest X-ray model (:func:`init_from_source`):
backbone tensors are copied where name and shape match, and the new head's
rows for class names the source also had start from the source's trained rows
("output neuron keeping", Bassi & Attux). Label-space extension (DETL, Basu et
al.) is the same operation with :func:`extended_classes` as the new label list.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch
from torch import nn

from cxr_ray.errors import ArtifactError
from cxr_ray.models.artifact import WEIGHTS_FILE, load_card, localize
from cxr_ray.models.build import backbone_blocks, get_submodule
from cxr_ray.models.modes import TRAIN_MODES, TrainMode
from cxr_ray.models.registry import get_arch
from cxr_ray.models.weights import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    WeightsError,
    load_state_dict,
)

# --------------------------------------------------------------------------- label spaces


def extended_classes(source_classes: list[str], data_classes: list[str]) -> list[str]:
    """The source's classes in their order, then the data's new classes, sorted (DETL)."""
    known = set(source_classes)
    return list(source_classes) + sorted(set(data_classes) - known)


# --------------------------------------------------------------------------- inheritance


def init_from_source(
    model: nn.Module,
    arch: str,
    classes: list[str],
    source: str,
    s3_endpoint: str | None = None,
    source_classes: list[str] | None = None,
) -> dict:
    """Initialise ``model`` (a fresh ``build_model(arch, len(classes))``) from ``source``.

    ``source`` is a cxr-ray artifact (a directory or URI with ``model.json``;
    its arch must equal ``arch``, its classes name the head rows) or a state
    dict file (``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin``) of a one- or
    three-channel network of the same architecture; a three-channel first
    convolution is summed to one channel as :func:`registry.adapt_first_conv_to_grey`
    does. For a plain state dict ``source_classes`` names its head rows (else
    no rows are kept). Returns a JSON-serialisable report of what was copied.
    """
    spec = get_arch(arch)
    head = get_submodule(model, spec.classifier)
    if not isinstance(head, nn.Linear) or head.out_features != len(classes):
        raise ValueError(
            f"{arch}: model head {spec.classifier} has {getattr(head, 'out_features', '?')} outputs "
            f"but {len(classes)} classes were given"
        )
    state, kind, source_arch, names = _read_source(source, arch, s3_endpoint)
    if names is None:
        names = list(source_classes) if source_classes is not None else None

    head_keys = {f"{spec.classifier}.weight", f"{spec.classifier}.bias"}
    target = model.state_dict()  # references to the live parameters and buffers
    with torch.no_grad():
        copied, skipped, first_conv = _copy_backbone(target, state, head_keys, f"{spec.first_conv}.weight")
        if copied == 0:
            raise WeightsError(
                f"{source}: no tensor matches a {arch} network by name and shape; "
                f"is it a state dict of a different architecture? (first source keys: {list(state)[:5]})"
            )
        kept, head_note = _keep_output_neurons(head, spec.classifier, state, classes, names, source)

    backbone_total = len(target) - len(head_keys & set(target))
    unused = sorted(k for k in state if k not in target)
    return {
        "source": str(source),
        "source_kind": kind,
        "source_arch": source_arch,
        "source_classes": names,
        "tensors_copied": copied,
        "tensors_skipped": skipped,
        "backbone_coverage": round(copied / max(backbone_total, 1), 4),
        "source_tensors_unused": len(unused),
        "source_tensors_unused_names": unused[:50],
        "first_conv": first_conv,
        "head": head_note,
        "kept_classes": kept,
        "new_classes": [c for c in classes if c not in kept],
    }


def _copy_backbone(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head_keys: set[str],
                   conv_key: str) -> tuple[int, list[dict[str, str]], str]:
    """Copy every non-head tensor of ``state`` that fits by name and shape into ``target`` (in place).

    Returns (tensors copied, the ones skipped and why, what happened to the first convolution:
    ``copied``, ``summed_rgb`` (3 channels summed to 1), ``skipped`` or ``missing``).
    """
    first_conv = "missing"
    copied, skipped = 0, []
    for name, tensor in target.items():
        if name in head_keys:
            continue
        if name not in state:
            skipped.append({"name": name, "reason": "not in source"})
            continue
        value = state[name]
        if name == conv_key and value.ndim == 4 and value.shape[1] == 3 and tensor.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
            first_conv = "summed_rgb"
        elif name == conv_key:
            first_conv = "copied"
        if tuple(value.shape) != tuple(tensor.shape):
            skipped.append({"name": name, "reason": f"shape {list(value.shape)} != {list(tensor.shape)}"})
            if name == conv_key:
                first_conv = "skipped"
            continue
        tensor.copy_(value.to(dtype=tensor.dtype))
        copied += 1
    return copied, skipped, first_conv


def _read_source(
    source: str, arch: str, s3_endpoint: str | None
) -> tuple[dict[str, torch.Tensor], str, str | None, list[str] | None]:
    """(state dict, "artifact" | "state_dict", source arch or None, source classes or None)."""
    source = os.fspath(source)
    path = urlparse(source).path if "://" in source else source
    suffix = PurePosixPath(path).suffix.lower()
    is_file = suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES or ("://" not in source and Path(source).is_file())
    if is_file:
        return load_state_dict(source, s3_endpoint=s3_endpoint), "state_dict", None, None

    if "://" not in source and not Path(source).exists():
        raise WeightsError(f"{source}: no such artifact directory or weights file")
    try:
        local = localize(source, s3_endpoint)
        card = load_card(str(local))
    except ArtifactError as exc:
        raise WeightsError(f"{source}: not a cxr-ray artifact or weights file: {exc}") from exc
    if card.arch != arch:
        raise WeightsError(
            f"{source}: the source model is a {card.arch}, the new one a {arch}; "
            f"transfer needs the same architecture (train with --arch {card.arch})"
        )
    state = load_state_dict(str(local / WEIGHTS_FILE))
    return state, "artifact", card.arch, list(card.classes)


def _keep_output_neurons(
    head: nn.Linear,
    head_path: str,
    state: dict[str, torch.Tensor],
    classes: list[str],
    source_classes: list[str] | None,
    source: str,
) -> tuple[list[str], str]:
    """Copy the source head's rows for shared class names into ``head``; (kept, note)."""
    weight = state.get(f"{head_path}.weight")
    bias = state.get(f"{head_path}.bias")
    if weight is None:
        return [], "fresh: the source has no classifier head"
    if source_classes is None:
        return [], "fresh: the source's class names are unknown (pass source_classes)"
    if weight.ndim != 2 or weight.shape[0] != len(source_classes):
        raise WeightsError(
            f"{source}: the source head has {weight.shape[0]} outputs but {len(source_classes)} "
            f"source classes were named: {source_classes}"
        )
    if weight.shape[1] != head.in_features:
        return [], f"fresh: source head takes {weight.shape[1]} features, this one {head.in_features}"
    kept = []
    for row, name in enumerate(classes):
        if name in source_classes:
            src = source_classes.index(name)
            head.weight[row].copy_(weight[src].to(head.weight.dtype))
            if bias is not None and head.bias is not None:
                head.bias[row].copy_(bias[src].to(head.bias.dtype))
            kept.append(name)
    return kept, "rows_kept" if kept else "fresh: no class name in common with the source"


# --------------------------------------------------------------------------- training modes


def _head_and_backbone(model: nn.Module, arch: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    spec = get_arch(arch)
    head_ids = {id(p) for p in get_submodule(model, spec.classifier).parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return head, backbone


def trainable_backbone(model: nn.Module, arch: str, finetune_blocks: int) -> list[nn.Parameter]:
    """Backbone parameters that train with ``finetune_blocks=N``: the last N stages onward.

    Parameters outside the stage container that come after the N-th last stage
    in registration order (VGG's fc6 / fc7 between its conv stages and the
    head) train too: they sit above the trained stages in the forward pass.
    """
    spec = get_arch(arch)
    blocks = backbone_blocks(model, spec)
    if not 1 <= finetune_blocks <= len(blocks):
        raise ValueError(
            f"{arch}: finetune_blocks must be 1..{len(blocks)} (its backbone has {len(blocks)} stages), "
            f"got {finetune_blocks}; use mode 'frozen' to train the head only"
        )
    _, backbone = _head_and_backbone(model, arch)
    frozen_ids = {id(p) for block in blocks[:-finetune_blocks] for p in block.parameters()}
    first_trained = id(next(iter(blocks[-finetune_blocks].parameters())))
    trained, reached = [], False
    for param in backbone:
        reached = reached or id(param) == first_trained
        if reached and id(param) not in frozen_ids:
            trained.append(param)
    return trained


def configure_mode(
    model: nn.Module,
    arch: str,
    mode: TrainMode,
    *,
    lr: float,
    backbone_lr_factor: float = 0.1,
    finetune_blocks: int | None = None,
) -> list[dict]:
    """Set ``requires_grad`` for ``mode`` and return the optimizer's param groups.

    Each group is ``{"name": "all" | "head" | "backbone", "params": [...], "lr": float}``
    (optimizers keep the extra ``name`` key). ``scratch``: one group, all at
    ``lr``. ``frozen``: the head only. ``finetune``: head at ``lr``, trainable
    backbone at ``lr * backbone_lr_factor``; with ``finetune_blocks=N`` only the
    last N stages of :func:`registry.backbone_blocks` train. Call
    :func:`set_train_mode` (not ``model.train()``) in the training loop so the
    frozen parts' BatchNorm statistics stay fixed.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; valid: {', '.join(TRAIN_MODES)}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if finetune_blocks is not None and mode != "finetune":
        raise ValueError(f"finetune_blocks applies to mode 'finetune' only, not {mode!r}")
    head, backbone = _head_and_backbone(model, arch)
    for param in model.parameters():
        param.requires_grad_(True)
    if mode == "scratch":
        return [{"name": "all", "params": head + backbone, "lr": lr}]
    if mode == "frozen":
        for param in backbone:
            param.requires_grad_(False)
        return [{"name": "head", "params": head, "lr": lr}]
    if backbone_lr_factor <= 0:
        raise ValueError(f"backbone_lr_factor must be > 0, got {backbone_lr_factor}")
    trained = backbone if finetune_blocks is None else trainable_backbone(model, arch, finetune_blocks)
    trained_ids = {id(p) for p in trained}
    for param in backbone:
        if id(param) not in trained_ids:
            param.requires_grad_(False)
    return [
        {"name": "backbone", "params": trained, "lr": lr * backbone_lr_factor},
        {"name": "head", "params": head, "lr": lr},
    ]


_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def freeze_batchnorm(module: nn.Module, *, only_frozen: bool = False) -> nn.Module:
    """Put BatchNorm layers of ``module`` in eval mode (running stats no longer update).

    With ``only_frozen``, only those whose affine parameters all have
    ``requires_grad=False``. ``model.train()`` undoes this; call it after.
    """
    for layer in module.modules():
        if isinstance(layer, _BATCHNORM):
            params = list(layer.parameters(recurse=False))
            if not only_frozen or (params and not any(p.requires_grad for p in params)):
                layer.eval()
    return module


def set_train_mode(model: nn.Module, arch: str, mode: TrainMode) -> nn.Module:
    """``model.train()`` for ``mode``: BatchNorm of frozen parameters stays in eval mode.

    Use after :func:`configure_mode`: a BatchNorm layer whose weight and bias
    do not train keeps its running statistics (ImageNet's or the source
    model's); in ``frozen`` mode that is the whole backbone, in ``finetune``
    with ``finetune_blocks`` the earlier stages.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; valid: {', '.join(TRAIN_MODES)}")
    model.train()
    if mode == "scratch":
        return model
    spec = get_arch(arch)
    head = get_submodule(model, spec.classifier)
    head_ids = {id(m) for m in head.modules()}
    for layer in model.modules():
        if isinstance(layer, _BATCHNORM) and id(layer) not in head_ids:
            params = list(layer.parameters(recurse=False))
            frozen = not any(p.requires_grad for p in params) if params else mode == "frozen"
            if frozen:
                layer.eval()
    return model
