"""Architecture registry: every CNN of the source papers, by name.

Each entry knows how to build the ImageNet-shaped network (3 channels, 1000
classes), where its first convolution, classifier and Grad-CAM layer are, and
its default input size and normalisation. :func:`build_model` turns that into a
one-channel, ``num_classes`` model, optionally starting from ImageNet weights.

Grey-scale X-rays enter as ONE channel. The first convolution's RGB kernels are
summed into a single kernel (timm's ``adapt_input_conv``), so ImageNet weights
still see the same total response as a grey image copied into three channels,
without spending memory and bandwidth on the copies.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    source: str  # "torchvision" | "timm"
    build_imagenet: Callable[[], nn.Module]  # random-init, 3-channel, 1000-class network
    first_conv: str  # dotted path to the first nn.Conv2d
    classifier: str  # dotted path to the final nn.Linear
    gradcam_layer: str  # dotted path Grad-CAM attributes to (last spatial feature map)
    default_image_size: int
    min_image_size: int  # smallest input the network's pooling stack accepts
    blocks: str = ""  # dotted path whose children are the backbone stages ("" = top level)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str | None = None  # enum member for ``--pretrained imagenet``
    timm_name: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def grey_mean(self) -> float:
        return float(np.mean(self.mean))

    @property
    def grey_std(self) -> float:
        return float(np.mean(self.std))


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(list_archs())}.{hint}") from None


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
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
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


# --- the architectures of the source papers -------------------------------------------


def _torchvision(builder_name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder_name)(weights=None, **kwargs)

    return build


def _inception_v3() -> nn.Module:
    import torchvision

    # transform_input re-normalises three RGB channels itself: wrong for grey input.
    # aux_logits must be True to load ImageNet weights; the aux head is dropped after.
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=True)
    model.aux_logits = False
    model.AuxLogits = None
    return model


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=1000)

    return build


for _spec in (
    # Grad-CAM at features.35, the ReLU after the last convolution (features.34): the rectified
    # last conv maps of Grad-CAM. At the convolution itself the channel sum was negative all over
    # the map, i.e. an all-zero heatmap, on 26 of 26 phantom pneumonia images.
    ArchSpec("vgg19", "torchvision", _torchvision("vgg19"), "features.0", "classifier.6", "features.35",
             224, 32, blocks="features", torchvision_weights="VGG19_Weights.IMAGENET1K_V1"),
    ArchSpec("mobilenet_v2", "torchvision", _torchvision("mobilenet_v2"), "features.0.0", "classifier.1",
             "features.18", 224, 32, blocks="features", torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V1"),
    ArchSpec("inception_v3", "torchvision", _inception_v3, "Conv2d_1a_3x3.conv", "fc", "Mixed_7c",
             299, 75, torchvision_weights="Inception_V3_Weights.IMAGENET1K_V1"),
    ArchSpec("resnet50", "torchvision", _torchvision("resnet50"), "conv1", "fc", "layer4",
             224, 32, torchvision_weights="ResNet50_Weights.IMAGENET1K_V1"),
    # Not from the source papers: a small ResNet that trains from scratch in minutes on a CPU
    # (development, tests, quick baselines on new data).
    ArchSpec("resnet18", "torchvision", _torchvision("resnet18"), "conv1", "fc", "layer4",
             224, 32, torchvision_weights="ResNet18_Weights.IMAGENET1K_V1",
             notes="small baseline for CPU runs and tests; not one of the papers' architectures"),
    ArchSpec("densenet121", "torchvision", _torchvision("densenet121"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet121_Weights.IMAGENET1K_V1"),
    ArchSpec("densenet169", "torchvision", _torchvision("densenet169"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet169_Weights.IMAGENET1K_V1"),
    ArchSpec("densenet201", "torchvision", _torchvision("densenet201"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet201_Weights.IMAGENET1K_V1"),
    ArchSpec("xception", "timm", _timm("legacy_xception"), "conv1", "fc", "act4", 299, 71,
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), timm_name="legacy_xception"),
    ArchSpec("inception_resnet_v2", "timm", _timm("inception_resnet_v2"), "conv2d_1a.conv", "classif",
             "conv2d_7b", 299, 75, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), timm_name="inception_resnet_v2"),
):
    register_arch(_spec)
