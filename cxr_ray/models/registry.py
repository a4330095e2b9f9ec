"""Architecture registry: every CNN of the source papers, by name.

Each entry knows how to build the ImageNet-shaped network (3 channels, 1000
classes), where its first convolution, classifier and Grad-CAM layer are, its
default input size and normalisation, and what the explainers need to know
about it (where LRP reads its map, or why it cannot; a finer Grad-CAM layer).
Every per-architecture fact lives here: nothing else names architectures. :func:`build_model` turns that into a
one-channel, ``num_classes`` model, optionally starting from ImageNet weights.

Plain data, no torch import: the CLI reads it for ``--help`` and validation in
no time. Building a network (:mod:`cxr_ray.models.build`) imports torchvision /
timm, inside the builders registered here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the registry is plain data: torch is imported when a network is built
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
    # Module structure the explainers rewrite for Captum: "vgg", "resnet", "densenet", ... .
    family: str = ""
    # LRP: where the map is read (None: the first convolution), or why this network has no LRP.
    lrp_readout: str | None = None
    lrp_unsupported: str | None = None
    # A stride-16 Grad-CAM layer (finer maps on small inputs), scored next to gradcam_layer.
    finer_gradcam_layer: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def supports_lrp(self) -> bool:
        return self.lrp_unsupported is None

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


# What the explainers (cxr_ray.explain) offer; which architecture supports which is read off the specs.
EXPLAIN_METHODS = ("gradcam", "lrp")


def archs_with_lrp() -> list[str]:
    """The architectures the explainers have LRP for (help texts, tests, ``supported_pairs``)."""
    return [name for name in list_archs() if _REGISTRY[name].supports_lrp]


def explain_methods_help() -> str:
    """``gradcam (every architecture) or lrp (vgg19, ...)``, for ``--help`` texts."""
    return f"gradcam (every architecture) or lrp ({', '.join(archs_with_lrp())})"


def get_arch(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(list_archs())}.{hint}") from None


# --- the architectures of the source papers -------------------------------------------


# The builders import torchvision / timm when called: building is deferred, listing is free.
def _torchvision(builder_name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision  # deferred: see above

        return getattr(torchvision.models, builder_name)(weights=None, **kwargs)

    return build


def _inception_v3() -> nn.Module:
    import torchvision  # deferred: see above

    # transform_input re-normalises three RGB channels itself: wrong for grey input.
    # aux_logits must be True to load ImageNet weights; the aux head is dropped after.
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=True)
    model.aux_logits = False
    model.AuxLogits = None
    return model


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # deferred: see above

        return timm.create_model(name, pretrained=False, num_classes=1000)

    return build


# Where the explainers read, and why (the measurements are in cxr_ray.explain.methods' docstring):
# DenseNet's LRP at the stride-16 transition pool, VGG-19's at its block-3 max pool (stride 8);
# finer Grad-CAM at the last stride-16 map.
_DENSENET_EXPLAIN: dict[str, Any] = {"family": "densenet", "lrp_readout": "features.transition2.pool",
                     "finer_gradcam_layer": "features.denseblock3"}

for _spec in (
    # Grad-CAM at features.35, the ReLU after the last convolution (features.34): the rectified
    # last conv maps of Grad-CAM. At the convolution itself the channel sum was negative all over
    # the map, i.e. an all-zero heatmap, on 26 of 26 phantom pneumonia images.
    ArchSpec("vgg19", "torchvision", _torchvision("vgg19"), "features.0", "classifier.6", "features.35",
             224, 32, blocks="features", torchvision_weights="VGG19_Weights.IMAGENET1K_V1",
             family="vgg", lrp_readout="features.18"),
    ArchSpec("mobilenet_v2", "torchvision", _torchvision("mobilenet_v2"), "features.0.0", "classifier.1",
             "features.18", 224, 32, blocks="features", torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V1",
             family="mobilenet", finer_gradcam_layer="features.13",
             lrp_unsupported="ReLU6 activations have no Captum LRP rule and the inverted-residual "
             "additions are functional"),
    ArchSpec("inception_v3", "torchvision", _inception_v3, "Conv2d_1a_3x3.conv", "fc", "Mixed_7c",
             299, 75, torchvision_weights="Inception_V3_Weights.IMAGENET1K_V1", family="inception",
             lrp_unsupported="its Inception blocks pool with functional F.max_pool2d / F.avg_pool2d, "
             "which Captum's LRP cannot attach a rule to"),
    ArchSpec("resnet50", "torchvision", _torchvision("resnet50"), "conv1", "fc", "layer4",
             224, 32, torchvision_weights="ResNet50_Weights.IMAGENET1K_V1", family="resnet",
             finer_gradcam_layer="layer3"),
    # Not from the source papers: a small ResNet that trains from scratch in minutes on a CPU
    # (development, tests, quick baselines on new data).
    ArchSpec("resnet18", "torchvision", _torchvision("resnet18"), "conv1", "fc", "layer4",
             224, 32, torchvision_weights="ResNet18_Weights.IMAGENET1K_V1", family="resnet",
             finer_gradcam_layer="layer3",
             notes="small baseline for CPU runs and tests; not one of the papers' architectures"),
    ArchSpec("densenet121", "torchvision", _torchvision("densenet121"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet121_Weights.IMAGENET1K_V1",
             **_DENSENET_EXPLAIN),
    ArchSpec("densenet169", "torchvision", _torchvision("densenet169"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet169_Weights.IMAGENET1K_V1",
             **_DENSENET_EXPLAIN),
    ArchSpec("densenet201", "torchvision", _torchvision("densenet201"), "features.conv0", "classifier",
             "features.norm5", 224, 32, blocks="features", torchvision_weights="DenseNet201_Weights.IMAGENET1K_V1",
             **_DENSENET_EXPLAIN),
    ArchSpec("xception", "timm", _timm("legacy_xception"), "conv1", "fc", "act4", 299, 71,
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), timm_name="legacy_xception", family="xception",
             lrp_unsupported="timm's separable convolutions and functional residual additions have no "
             "Captum LRP rule"),
    ArchSpec("inception_resnet_v2", "timm", _timm("inception_resnet_v2"), "conv2d_1a.conv", "classif",
             "conv2d_7b", 299, 75, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), timm_name="inception_resnet_v2",
             family="inception_resnet",
             lrp_unsupported="timm's scaled residual additions (x * scale + branch) are "
             "functional and have no Captum LRP rule"),
):
    register_arch(_spec)
