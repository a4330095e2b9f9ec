"""Building a registered architecture: a one-channel, ``num_classes`` network, optionally from ImageNet weights.

Grey-scale X-rays enter as ONE channel. The first convolution's RGB kernels are
summed into a single kernel (timm's ``adapt_input_conv``), so ImageNet weights
still see the same total response as a grey image copied into three channels,
without spending memory and bandwidth on the copies.
"""

from __future__ import annotations

import torch
from torch import nn

from cxr_ray.models.registry import ArchSpec, get_arch


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(get_submodule(model, parent_path), child, module)


def backbone_blocks(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """The backbone's stages in forward order (for ``finetune`` of the last N blocks).

    A normalisation layer standing alone after a stage (DenseNet's ``norm5``,
    Xception's ``bn4``) belongs to that stage, so "last block" means real layers.
    """
    container = get_submodule(model, spec.blocks)
    classifier_root = spec.classifier.split(".")[0]
    groups: list[list[nn.Module]] = []
    for name, child in container.named_children():
        if not spec.blocks and name == classifier_root:
            continue
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, nn.modules.batchnorm._NormBase) and groups:
            groups[-1].append(child)
        else:
            groups.append([child])
    return [group[0] if len(group) == 1 else nn.ModuleList(group) for group in groups]


def adapt_first_conv_to_grey(model: nn.Module, spec: ArchSpec) -> None:
    """Replace the RGB first convolution by a one-channel one whose kernel is the RGB sum."""
    conv = get_submodule(model, spec.first_conv)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{spec.name}: {spec.first_conv} is {type(conv).__name__}, not Conv2d")
    grey = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)  # type: ignore[union-attr]
    set_submodule(model, spec.first_conv, grey)


def replace_classifier(model: nn.Module, spec: ArchSpec, num_classes: int) -> nn.Linear:
    old = get_submodule(model, spec.classifier)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.name}: {spec.classifier} is {type(old).__name__}, not Linear")
    head = nn.Linear(old.in_features, num_classes)
    set_submodule(model, spec.classifier, head)
    return head


def build_model(
    arch: str,
    num_classes: int,
    *,
    imagenet_state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A one-channel ``num_classes`` network of ``arch``; ImageNet weights if given.

    ``imagenet_state_dict`` is the 3-channel, 1000-class state dict of the same
    architecture (torchvision / timm format); see :mod:`cxr_ray.models.weights`.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    spec = get_arch(arch)
    model = spec.build_imagenet()
    if imagenet_state_dict is not None:
        missing, unexpected = model.load_state_dict(imagenet_state_dict, strict=False)
        significant = [k for k in missing if "num_batches_tracked" not in k]
        if significant or unexpected:
            raise ValueError(
                f"{arch}: pretrained weights do not fit (missing {significant[:5]}, unexpected {list(unexpected)[:5]})"
            )
    adapt_first_conv_to_grey(model, spec)
    replace_classifier(model, spec, num_classes)
    return model
