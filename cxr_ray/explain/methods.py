"""Where the network looks: Grad-CAM (Basu et al.) and LRP (Bassi & Attux) through Captum.

Both methods run on a private copy of the caller's model, never the model
itself: in-place activations are switched off (they overwrite the tensors that
Captum's hooks keep), parameters stop requiring gradients (only activations
need them), and the few functional operations in torchvision's forward methods
that matter are replaced by modules, because Captum's LRP attaches one
propagation rule per module and cannot see a bare ``F.relu``,
``F.adaptive_avg_pool2d`` or ``out += identity``. The copy computes the same
function (tests compare logits). The attribution arithmetic is Captum's.

Grad-CAM
    ``captum.attr.LayerGradCam`` at ``layer`` (default: the registry's
    ``ArchSpec.gradcam_layer``, the last spatial feature map), positive part,
    then ``LayerAttribution.interpolate`` (bilinear) straight to the original
    image size, which also undoes the square resize of preprocessing. That map
    has the network's final stride: 32 px for most registered networks, i.e.
    7 x 7 cells at 224 px but 4 x 4 at 128 px; on small inputs an earlier
    ``layer`` (e.g. ``features.denseblock3``) trades depth for resolution.

LRP
    ``captum.attr.LayerLRP`` with LRP-epsilon (Captum's rule for convolution,
    batch norm, dense and pooling layers; epsilon 1e-9) from the target logit
    down to ``layer``, summed over its channels, positive part (evidence *for*
    the class). What the copy changes for LRP: VGG-19 is modules only already;
    ResNets' batch norms are folded into their convolutions (exact in eval
    mode) and their residual sums use Captum's ``Addition_Module``; DenseNet's
    closing ReLU / pooling become modules (the dense blocks' ``torch.cat``
    needs nothing: its gradient splits relevance exactly).

    Default ``layer``: the first convolution (``ArchSpec.first_conv``), i.e.
    pixel-level maps (ResNets; DenseNet and VGG-19 are read deeper, below).
    Not the pixels themselves: the input is a standardised grey image with
    negative values, which flips the sign of pixel relevance
    under the epsilon/gamma rules, and Captum has no z^B / flat rule for an
    input layer.

    DenseNet is read at ``features.transition2.pool`` (stride
    16). Its layers run batch norm -> ReLU -> convolution and every batch norm
    follows a concatenation of many earlier convolutions, so no batch norm can
    be folded into a neighbouring linear layer (the canonicalisation LRP
    relies on; zennit issue #165 discusses the same problem); Captum then
    propagates through each batch norm as an affine layer whose shift absorbs
    or inflates relevance, and the error compounds block after block. On
    phantom-trained DenseNet-121s (see :mod:`cxr_ray.explain.phantom_check`)
    the first-convolution map missed the faint covid lesions in two of three
    trainings (energy ratio 0.5-2.0; chance 1.0) while the stride-16 readout
    found them in all three (1.9-4.2). Pass ``layer="features.conv0"`` for the
    pixel-level DenseNet map anyway.

    VGG-19 is read at ``features.18`` (the block-3 max pool, stride 8). On a
    phantom-trained VGG-19 (64 px, eval accuracy 0.89) the first-convolution
    map fell below chance on the covid lesions (energy ratio 0.13; pointing 0
    of 32), the block-4 pool ``features.27`` (stride 16) was near it (1.39)
    and ``features.18`` found them (2.51; 4 %-tolerant pointing 0.75 against
    chance 0.065). Pass ``layer="features.0"`` for the pixel-level map.

    Gamma rules on the lower layers and larger epsilons localised worse than
    plain epsilon on every model tried.

Every heatmap is float32 (H, W) at the original image size, scaled to [0, 1]
by its maximum (all zeros when there is no positive evidence at all).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cxr_ray.errors import UsageError
from cxr_ray.preprocess import preprocess

METHODS = ("gradcam", "lrp")
LRP_EPSILON = 1e-9  # Captum's default: plain LRP-epsilon (larger values erased the faint covid haze)

# Architectures whose every operation Captum's LRP can take a rule for, once the
# functional bits of torchvision's forward are turned into modules (explainable_copy).
_LRP_ARCHS = ("densenet121", "densenet169", "densenet201", "resnet18", "resnet50", "vgg19")

# Where LRP is read when not at the first convolution (see the module docstring).
_LRP_READOUT = {
    "densenet121": "features.transition2.pool",
    "densenet169": "features.transition2.pool",
    "densenet201": "features.transition2.pool",
    "vgg19": "features.18",  # block-3 max pool, stride 8
}

# Why the other registered architectures have no LRP: said in the error.
_LRP_UNSUPPORTED_WHY = {
    "mobilenet_v2": "ReLU6 activations have no Captum LRP rule and the inverted-residual "
    "additions are functional",
    "inception_v3": "its Inception blocks pool with functional F.max_pool2d / F.avg_pool2d, "
    "which Captum's LRP cannot attach a rule to",
    "xception": "timm's separable convolutions and functional residual additions have no "
    "Captum LRP rule",
    "inception_resnet_v2": "timm's scaled residual additions (x * scale + branch) are "
    "functional and have no Captum LRP rule",
}


class UnsupportedExplanationError(UsageError, ValueError):
    """An (architecture, method) pair this module cannot explain; lists the pairs it can."""


class UnknownTargetError(UsageError, ValueError):
    """The class to explain is not one of the model's classes."""


class UnknownLayerError(UsageError, ValueError):
    """The layer asked for is not a module of the (explainable copy of the) network."""


@dataclass(frozen=True)
class Explanation:
    """One heatmap: float32 (H, W) at the original image size, in [0, 1]."""

    heatmap: np.ndarray
    target_class: str
    target_index: int
    score: float  # softmax probability of ``target_class``
    method: str
    probabilities: dict[str, float]
    layer: str  # the module the map was read at (Grad-CAM's layer, LRP's readout)


def supported_pairs() -> list[tuple[str, str]]:
    """Every (architecture, method) pair :func:`explain` accepts."""
    from cxr_ray.models.registry import list_archs

    pairs = [(arch, "gradcam") for arch in list_archs()]
    pairs += [(arch, "lrp") for arch in list_archs() if arch in _LRP_ARCHS]
    return sorted(pairs)


def check_supported(arch: str, method: str) -> None:
    """Raise :class:`UnsupportedExplanationError` unless ``(arch, method)`` is supported."""
    listed = ", ".join(f"{a}/{m}" for a, m in supported_pairs())
    if method not in METHODS:
        raise UnsupportedExplanationError(
            f"unknown explanation method {method!r}; valid: {', '.join(METHODS)}"
        )
    if (arch, method) in supported_pairs():
        return
    why = _LRP_UNSUPPORTED_WHY.get(arch, "not an architecture this module knows")
    raise UnsupportedExplanationError(
        f"{method} is not supported for architecture {arch!r} ({why}); supported pairs: {listed}"
    )


def default_layer(arch: str, method: str) -> str:
    """Where ``method`` reads its map by default: the registry's Grad-CAM layer; for LRP the
    first convolution, or DenseNet's ``features.transition2.pool`` / VGG-19's ``features.18``
    (see the module docstring)."""
    from cxr_ray.models.registry import get_arch

    spec = get_arch(arch)
    if method == "gradcam":
        return spec.gradcam_layer
    return _LRP_READOUT.get(arch, spec.first_conv)


# --------------------------------------------------------------------------- model copies


def _no_inplace(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return net


class _ModularDenseNet(nn.Module):
    """torchvision DenseNet whose forward uses modules only (same parameters, same output).

    torchvision's ``DenseNet.forward`` ends with ``F.relu(..., inplace=True)`` and
    ``F.adaptive_avg_pool2d``: the first overwrites the Grad-CAM layer's output
    (``features.norm5``) under Captum's hook, the second hides the pooling from
    LRP, which then spreads relevance evenly instead of in proportion to the
    activations. The dense blocks' ``torch.cat`` needs nothing: concatenation
    is an identity on every element, and its gradient splits relevance exactly.
    """

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.features = densenet.features
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.features(x)))
        return self.classifier(torch.flatten(out, 1))


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval())


class _LRPResidualBlock(nn.Module):
    """A torchvision ResNet ``Bottleneck`` or ``BasicBlock`` for LRP: batch norms folded into
    the convolutions (exactly the same function in eval mode), one ReLU module per use, and
    the residual sum as Captum's ``Addition_Module`` so relevance splits in proportion to
    each branch."""

    def __init__(self, block: nn.Module) -> None:
        from captum.attr._utils.custom_modules import Addition_Module

        super().__init__()
        depth = 3 if hasattr(block, "conv3") else 2
        layers: list[nn.Module] = []
        for i in range(1, depth + 1):
            layers.append(_fuse(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            if i < depth:
                layers.append(nn.ReLU())
        self.branch = nn.Sequential(*layers)
        self.downsample = (
            _fuse(block.downsample[0], block.downsample[1]) if block.downsample is not None else None
        )
        self.add = Addition_Module()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.add(self.branch(x), identity))


class _LRPResNet(nn.Module):
    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1 = _fuse(resnet.conv1, resnet.bn1)
        self.relu = nn.ReLU()
        self.maxpool = resnet.maxpool
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, nn.Sequential(*(_LRPResidualBlock(b) for b in getattr(resnet, name))))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = resnet.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def explainable_copy(model: nn.Module, arch: str, method: str) -> nn.Module:
    """A deep copy of ``model`` Captum can hook: eval mode, no in-place ops, frozen weights.

    Same function as ``model`` (tests check the logits): only the module structure
    changes, where Captum needs it.
    """
    with torch.inference_mode(False):  # a copy made under inference_mode could not be differentiated
        net = _no_inplace(copy.deepcopy(model)).eval()
        if arch.startswith("densenet"):
            net = _ModularDenseNet(net)  # its functional in-place ReLU breaks Grad-CAM too
        elif method == "lrp" and arch.startswith("resnet"):
            net = _LRPResNet(net)
        for param in net.parameters():
            param.requires_grad_(False)
    return net.eval()


# --------------------------------------------------------------------------- LRP rules


def _leaf_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if len(list(m.children())) == 0]


def _attach_lrp_rules(net: nn.Module, epsilon: float = LRP_EPSILON) -> None:
    """LRP-epsilon on every convolution, batch norm, dense and pooling layer.

    Captum removes every ``rule`` attribute after each ``attribute`` call, so this
    runs before each one.
    """
    from captum.attr._utils.lrp_rules import EpsilonRule

    for layer in _leaf_layers(net):
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            layer.rule = EpsilonRule(epsilon=epsilon)


# --------------------------------------------------------------------------- explainer


def _normalise(heatmap: torch.Tensor) -> np.ndarray:
    out = heatmap.detach().clamp(min=0).to(torch.float32).cpu().numpy()[0, 0]
    peak = float(out.max()) if out.size else 0.0
    return (out / peak if peak > 0 else np.zeros_like(out)).astype(np.float32)


class Explainer:
    """Heatmaps for one model + card and one method; build once, call per image.

    Holds a private copy of the model (see module docstring), so building one
    costs a model copy: the HTTP endpoint and screening keep one per replica.
    Not thread-safe (LRP sets rules on the copy's modules during a call): one
    Explainer per thread.
    """

    def __init__(self, model: nn.Module, card, method: str = "gradcam", *, layer: str | None = None) -> None:
        from cxr_ray.models.registry import get_submodule

        check_supported(card.arch, method)
        self.card = card
        self.method = method
        self.config = card.preprocess_config
        self.net = explainable_copy(model, card.arch, method)
        self.device = next(self.net.parameters()).device
        self.layer = layer or default_layer(card.arch, method)
        try:
            self._layer_module = get_submodule(self.net, self.layer)
        except AttributeError:
            names = [n for n, m in self.net.named_modules() if n and isinstance(m, nn.Conv2d)][:8]
            raise UnknownLayerError(
                f"{card.arch} has no layer {self.layer!r} (for {method}); e.g. {', '.join(names)}, ..."
            ) from None
        if method == "lrp" and next(self._layer_module.children(), None) is not None:
            # Captum's LayerLRP reads relevance off the propagation rule of ONE layer; a container
            # (a ResNet stage, a dense block) has none and Captum fails with an AttributeError.
            from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES

            ruled = tuple(SUPPORTED_LAYERS_WITH_RULES)
            leaves = [f"{self.layer}.{n}" for n, m in self._layer_module.named_modules() if n and isinstance(m, ruled)]
            raise UnknownLayerError(
                f"LRP reads relevance at a single layer with a propagation rule; {self.layer!r} is a "
                f"{type(self._layer_module).__name__} of several. Pick one inside it, e.g. its last: "
                f"{', '.join(reversed(leaves[-3:]))}"
            )

    def resolve_target(self, target: str | int | None, probabilities: np.ndarray) -> int:
        classes = self.card.classes
        if target is None:
            return int(np.argmax(probabilities))
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if not 0 <= int(target) < len(classes):
                raise UnknownTargetError(f"class index {target} out of range for classes {classes}")
            return int(target)
        if target in classes:
            return classes.index(target)
        raise UnknownTargetError(f"unknown class {target!r}; valid: {', '.join(classes)}")

    def __call__(self, pixels: np.ndarray, target: str | int | None = None) -> Explanation:
        return self.explain(pixels, target)

    def explain(self, pixels: np.ndarray, target: str | int | None = None) -> Explanation:
        """Heatmap for ``target`` (class name, index, or None = the predicted class)."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 2:
            raise ValueError(f"pixels must be a 2-D (H, W) grey image, got shape {pixels.shape}")
        height, width = pixels.shape
        # Serving code may run under inference_mode / no_grad: attribution needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.from_numpy(preprocess(pixels, self.config))[None].to(self.device)
            x.requires_grad_(True)
            with torch.no_grad():
                probs = torch.softmax(self.net(x), dim=1)[0].double().cpu().numpy()
            index = self.resolve_target(target, probs)
            raw = self._gradcam(x, index) if self.method == "gradcam" else self._lrp(x, index)
            from captum.attr import LayerAttribution

            heat = LayerAttribution.interpolate(raw.detach().float(), (height, width), "bilinear")
        classes = self.card.classes
        return Explanation(
            heatmap=_normalise(heat),
            target_class=classes[index],
            target_index=index,
            score=float(probs[index]),
            method=self.method,
            probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)},
            layer=self.layer,
        )

    def _gradcam(self, x: torch.Tensor, index: int) -> torch.Tensor:
        from captum.attr import LayerGradCam

        return LayerGradCam(self.net, self._layer_module).attribute(x, target=index, relu_attributions=True)

    def _lrp(self, x: torch.Tensor, index: int) -> torch.Tensor:
        from captum.attr import LayerLRP

        _attach_lrp_rules(self.net)
        relevance = LayerLRP(self.net, self._layer_module).attribute(x, target=index)
        return relevance.sum(dim=1, keepdim=True)  # relevance per position, over the channels


def explain_to_png_bytes(
    model: nn.Module,
    card,
    pixels: np.ndarray,
    *,
    method: str = "gradcam",
    target: str | int | None = None,
    alpha: float = 0.5,
    layer: str | None = None,
    explainer: Explainer | None = None,
) -> bytes:
    """The heatmap overlay as PNG bytes at the original size (screening's flagged rows).

    Pass ``explainer`` (built once for ``model``/``card``/``method``) when
    explaining many images, to avoid a model copy per image.
    """
    from cxr_ray.explain.overlay import overlay_png_bytes

    if explainer is None:
        explainer = Explainer(model, card, method, layer=layer)
    elif explainer.method != method or explainer.card.arch != card.arch:
        raise ValueError(
            f"explainer is for {explainer.card.arch}/{explainer.method}, asked for {card.arch}/{method}"
        )
    return overlay_png_bytes(pixels, explainer.explain(pixels, target).heatmap, alpha=alpha)


def explain(
    model: nn.Module,
    card,
    pixels: np.ndarray,
    *,
    method: str = "gradcam",
    target: str | int | None = None,
    layer: str | None = None,
) -> Explanation:
    """Heatmap of ``method`` for one decoded image (H, W) in [0, 1], at its original size.

    ``target``: a class name, a class index, or None for the predicted class.
    ``layer``: where the map is read (default: the registry's Grad-CAM layer, or
    the first convolution for LRP). Builds a fresh :class:`Explainer` (one model
    copy); reuse an Explainer for many images.
    """
    return Explainer(model, card, method, layer=layer).explain(pixels, target)
