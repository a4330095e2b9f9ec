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

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, LayerLRP
from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES
from torch import nn

from cxr_ray.errors import UsageError
from cxr_ray.explain.captum_models import attach_lrp_rules, explainable_copy
from cxr_ray.models.build import get_submodule
from cxr_ray.models.card import ModelCard
from cxr_ray.models.ensemble import FoldEnsemble
from cxr_ray.models.registry import EXPLAIN_METHODS, get_arch, list_archs
from cxr_ray.preprocess import preprocess

METHODS = EXPLAIN_METHODS


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
    """Every (architecture, method) pair :func:`explain` accepts (read off the registry)."""
    pairs = [(arch, "gradcam") for arch in list_archs()]
    pairs += [(arch, "lrp") for arch in list_archs() if get_arch(arch).supports_lrp]
    return sorted(pairs)


def archs_with(method: str) -> list[str]:
    """The architectures ``method`` supports, e.g. for ``--help`` text."""
    return [arch for arch, m in supported_pairs() if m == method]


def check_supported(arch: str, method: str) -> None:
    """Raise :class:`UnsupportedExplanationError` unless ``(arch, method)`` is supported."""
    listed = ", ".join(f"{a}/{m}" for a, m in supported_pairs())
    if method not in METHODS:
        raise UnsupportedExplanationError(
            f"unknown explanation method {method!r}; valid: {', '.join(METHODS)}"
        )
    if (arch, method) in supported_pairs():
        return
    try:
        why = get_arch(arch).lrp_unsupported or "not supported"
    except ValueError:
        why = "not an architecture this module knows"
    raise UnsupportedExplanationError(
        f"{method} is not supported for architecture {arch!r} ({why}); supported pairs: {listed}"
    )


def default_layer(arch: str, method: str) -> str:
    """Where ``method`` reads its map by default: the registry's Grad-CAM layer; for LRP the
    first convolution, or DenseNet's ``features.transition2.pool`` / VGG-19's ``features.18``
    (see the module docstring; the layers are the registry's)."""
    spec = get_arch(arch)
    if method == "gradcam":
        return spec.gradcam_layer
    return spec.lrp_readout or spec.first_conv


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

    def __init__(self, model: nn.Module, card: ModelCard, method: str = "gradcam", *, layer: str | None = None) -> None:
        check_supported(card.arch, method)
        self.card = card
        self.method = method
        self.config = card.preprocess_config
        # A fold ensemble is explained member by member (each its own copy); the maps are averaged.
        members = list(model.members) if isinstance(model, FoldEnsemble) else [model]
        self.nets = [explainable_copy(member, card.arch, method) for member in members]
        self.net = self.nets[0]
        self._scorer = model if isinstance(model, FoldEnsemble) else self.net  # the probabilities explained
        self.device = next(self.net.parameters()).device
        self.layer = layer or default_layer(card.arch, method)
        try:
            self._layer_modules = [get_submodule(net, self.layer) for net in self.nets]
            self._layer_module = self._layer_modules[0]
        except AttributeError:
            names = [n for n, m in self.net.named_modules() if n and isinstance(m, nn.Conv2d)][:8]
            raise UnknownLayerError(
                f"{card.arch} has no layer {self.layer!r} (for {method}); e.g. {', '.join(names)}, ..."
            ) from None
        if method == "lrp" and next(self._layer_module.children(), None) is not None:
            # Captum's LayerLRP reads relevance off the propagation rule of ONE layer; a container
            # (a ResNet stage, a dense block) has none and Captum fails with an AttributeError.
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
                probs = torch.softmax(self._scorer(x), dim=1)[0].double().cpu().numpy()
            index = self.resolve_target(target, probs)
            maps = []
            for net, layer_module in zip(self.nets, self._layer_modules, strict=True):
                raw = self._gradcam(net, layer_module, x, index) if self.method == "gradcam" else \
                    self._lrp(net, layer_module, x, index)
                heat = LayerAttribution.interpolate(raw.detach().float(), (height, width), "bilinear")
                maps.append(torch.from_numpy(_normalise(heat))[None, None])
        classes = self.card.classes
        return Explanation(
            # each member's map scaled to [0, 1] first, so no member dominates by its activation scale
            heatmap=_normalise(torch.stack(maps).mean(dim=0)),
            target_class=classes[index],
            target_index=index,
            score=float(probs[index]),
            method=self.method,
            probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)},
            layer=self.layer,
        )

    @staticmethod
    def _gradcam(net: nn.Module, layer: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
        return LayerGradCam(net, layer).attribute(x, target=index, relu_attributions=True)

    @staticmethod
    def _lrp(net: nn.Module, layer: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
        attach_lrp_rules(net)
        relevance = LayerLRP(net, layer).attribute(x, target=index)
        return relevance.sum(dim=1, keepdim=True)  # relevance per position, over the channels


def explain(
    model: nn.Module,
    card: ModelCard,
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
