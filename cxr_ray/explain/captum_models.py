"""Private copies of a network that Captum can hook: same function, modules where Captum needs them.

See :mod:`cxr_ray.explain.methods` for why: in-place activations overwrite
what Captum's hooks keep, and LRP attaches one propagation rule per module, so
the functional bits of torchvision's forward methods become modules here.
Which rewrite a network gets is its registry family
(:attr:`cxr_ray.models.registry.ArchSpec.family`).
"""

from __future__ import annotations

import copy

import torch
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cxr_ray.models.registry import get_arch

LRP_EPSILON = 1e-9  # Captum's default: plain LRP-epsilon (larger values erased the faint covid haze)

def _no_inplace(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
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
        out = self.pool(self.relu(self.features(x)))  # type: ignore[operator]
        return self.classifier(torch.flatten(out, 1))  # type: ignore[operator]


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    return fuse_conv_bn_eval(conv.eval(), bn.eval())


class _LRPResidualBlock(nn.Module):
    """A torchvision ResNet ``Bottleneck`` or ``BasicBlock`` for LRP: batch norms folded into
    the convolutions (exactly the same function in eval mode), one ReLU module per use, and
    the residual sum as Captum's ``Addition_Module`` so relevance splits in proportion to
    each branch."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        depth = 3 if hasattr(block, "conv3") else 2
        layers: list[nn.Module] = []
        for i in range(1, depth + 1):
            layers.append(_fuse(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            if i < depth:
                layers.append(nn.ReLU())
        self.branch = nn.Sequential(*layers)
        self.downsample = (
            _fuse(block.downsample[0], block.downsample[1]) if block.downsample is not None else None  # type: ignore[arg-type, index]
        )
        self.add = Addition_Module()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.add(self.branch(x), identity))


class _LRPResNet(nn.Module):
    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1 = _fuse(resnet.conv1, resnet.bn1)  # type: ignore[arg-type]
        self.relu = nn.ReLU()
        self.maxpool = resnet.maxpool
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, nn.Sequential(*(_LRPResidualBlock(b) for b in getattr(resnet, name))))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = resnet.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.conv1(x)))  # type: ignore[operator]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # type: ignore[operator]
        return self.fc(torch.flatten(self.avgpool(x), 1))  # type: ignore[operator]


def explainable_copy(model: nn.Module, arch: str, method: str) -> nn.Module:
    """A deep copy of ``model`` Captum can hook: eval mode, no in-place ops, frozen weights.

    Same function as ``model`` (tests check the logits): only the module structure
    changes, where Captum needs it.
    """
    family = get_arch(arch).family
    with torch.inference_mode(False):  # a copy made under inference_mode could not be differentiated
        net = _no_inplace(copy.deepcopy(model)).eval()
        if family == "densenet":
            net = _ModularDenseNet(net)  # its functional in-place ReLU breaks Grad-CAM too
        elif method == "lrp" and family == "resnet":
            net = _LRPResNet(net)
        for param in net.parameters():
            param.requires_grad_(False)
    return net.eval()


def _leaf_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if len(list(m.children())) == 0]


def attach_lrp_rules(net: nn.Module, epsilon: float = LRP_EPSILON) -> None:
    """LRP-epsilon on every convolution, batch norm, dense and pooling layer.

    Captum removes every ``rule`` attribute after each ``attribute`` call, so this
    runs before each one.
    """
    for layer in _leaf_layers(net):
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            layer.rule = EpsilonRule(epsilon=epsilon)
