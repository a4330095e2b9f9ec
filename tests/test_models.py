"""Every registered architecture builds, runs forward/backward on one-channel input
and exposes the layers other parts rely on (parametrized over the registry, so a
newly registered architecture is tested with no extra code)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_ray.models.build import backbone_blocks, build_model, get_submodule
from cxr_ray.models.registry import get_arch, list_archs

PAPER_ARCHS = {
    "vgg19", "mobilenet_v2", "inception_v3", "xception", "inception_resnet_v2",
    "densenet121", "densenet169", "densenet201", "resnet50",
}


def test_registry_has_every_paper_architecture():
    assert set(list_archs()) >= PAPER_ARCHS


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        get_arch("densenet12")
    message = str(info.value)
    assert "densenet121" in message and "mobilenet_v2" in message and "Did you mean" in message


@pytest.mark.parametrize("arch", list_archs())
def test_forward_backward_one_channel(arch):
    spec = get_arch(arch)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3)
    size = max(64, spec.min_image_size)
    x = torch.randn(2, 1, size, size)
    logits = model.train()(x)
    assert logits.shape == (2, 3)
    logits.logsumexp(dim=1).sum().backward()
    first = get_submodule(model, spec.first_conv)
    assert first.in_channels == 1 and first.weight.grad is not None
    head = get_submodule(model, spec.classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    assert isinstance(get_submodule(model, spec.gradcam_layer), nn.Module)
    assert len(backbone_blocks(model, spec)) >= 4
    assert spec.default_image_size >= spec.min_image_size


def test_grey_conv_is_sum_of_pretrained_rgb_kernels():
    spec = get_arch("resnet50")
    imagenet = spec.build_imagenet().state_dict()
    model = build_model("resnet50", 2, imagenet_state_dict=imagenet)
    expected = imagenet["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(model.conv1.weight, expected)
    # A grey image copied into three channels gives the same first-layer response.
    x = torch.rand(1, 1, 32, 32)
    rgb_conv = spec.build_imagenet().conv1
    rgb_conv.load_state_dict({"weight": imagenet["conv1.weight"]})
    torch.testing.assert_close(model.conv1(x), rgb_conv(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_pretrained_weights_of_the_wrong_arch_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        build_model("resnet50", 2, imagenet_state_dict=get_arch("mobilenet_v2").build_imagenet().state_dict())
