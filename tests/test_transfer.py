"""Transfer from earlier models (output-neuron keeping, label extension) and training modes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import backbone_blocks, build_model
from cxr_ray.models.card import new_card
from cxr_ray.models.registry import get_arch
from cxr_ray.models.transfer import (
    configure_mode,
    extended_classes,
    init_from_source,
    set_train_mode,
)
from cxr_ray.models.weights import WeightsError

ARCH = "mobilenet_v2"
HEAD = get_arch(ARCH).classifier  # "classifier.1"
SOURCE_CLASSES = ["normal", "pneumonia", "other_disease"]


@pytest.fixture(scope="module")
def source_artifact(tmp_path_factory):
    """A trained-looking source CXR model (random weights, non-trivial BN stats) saved as an artifact."""
    torch.manual_seed(0)
    model = build_model(ARCH, len(SOURCE_CLASSES))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
    directory = tmp_path_factory.mktemp("source") / "model"
    save_artifact(directory, model, new_card(name="src", arch=ARCH, classes=SOURCE_CLASSES, image_size=64))
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(num_classes: int, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH, num_classes)


def _head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    head = model.get_submodule(HEAD)
    return head.weight.detach().clone(), head.bias.detach().clone()


def test_output_neuron_keeping_from_artifact(source_artifact):
    directory, source = source_artifact
    classes = ["covid", "normal", "pneumonia"]
    model = _fresh(len(classes))
    fresh_w, fresh_b = _head(model)
    report = init_from_source(model, ARCH, classes, str(directory))

    weight, bias = _head(model)
    src_w, src_b = source[f"{HEAD}.weight"], source[f"{HEAD}.bias"]
    assert torch.equal(weight[1], src_w[0]) and torch.equal(bias[1], src_b[0])  # normal
    assert torch.equal(weight[2], src_w[1]) and torch.equal(bias[2], src_b[1])  # pneumonia
    assert torch.equal(weight[0], fresh_w[0]) and torch.equal(bias[0], fresh_b[0])  # covid: fresh
    state = model.state_dict()
    backbone = [k for k in state if not k.startswith(HEAD)]
    for key in backbone:
        assert torch.equal(state[key], source[key]), key  # bit-exact, BN stats included
    assert report["source_kind"] == "artifact" and report["source_arch"] == ARCH
    assert report["source_classes"] == SOURCE_CLASSES
    assert report["kept_classes"] == ["normal", "pneumonia"] and report["new_classes"] == ["covid"]
    assert report["tensors_copied"] == len(backbone) and report["tensors_skipped"] == []
    assert report["first_conv"] == "copied" and report["backbone_coverage"] == 1.0


def test_label_extension_keeps_old_rows(source_artifact):
    directory, source = source_artifact
    classes = extended_classes(SOURCE_CLASSES, ["pneumonia", "normal", "covid", "bacterial"])
    assert classes == ["normal", "pneumonia", "other_disease", "bacterial", "covid"]
    assert extended_classes(["b", "a"], ["a", "b"]) == ["b", "a"]
    model = _fresh(len(classes))
    fresh_w, _ = _head(model)
    report = init_from_source(model, ARCH, classes, str(directory))
    weight, bias = _head(model)
    assert torch.equal(weight[:3], source[f"{HEAD}.weight"]) and torch.equal(bias[:3], source[f"{HEAD}.bias"])
    assert torch.equal(weight[3:], fresh_w[3:])
    assert report["kept_classes"] == SOURCE_CLASSES and report["new_classes"] == ["bacterial", "covid"]


def test_three_channel_torchvision_state_dict(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.mobilenet_v2(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "tv.safetensors"))
    model = _fresh(2)
    fresh_w, _ = _head(model)
    report = init_from_source(model, ARCH, ["covid", "normal"], str(tmp_path / "tv.safetensors"))
    state = model.state_dict()
    assert torch.equal(state["features.0.0.weight"], reference["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(state["features.17.conv.0.0.weight"], reference["features.17.conv.0.0.weight"])
    assert torch.equal(_head(model)[0], fresh_w)  # 1000-class ImageNet head: nothing kept
    assert report["source_kind"] == "state_dict" and report["first_conv"] == "summed_rgb"
    assert report["kept_classes"] == [] and report["head"].startswith("fresh")


def test_plain_state_dict_with_source_classes(tmp_path, source_artifact):
    _, source = source_artifact
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "ckpt.pth")
    model = _fresh(2)
    report = init_from_source(
        model, ARCH, ["pneumonia", "covid"], str(tmp_path / "ckpt.pth"), source_classes=SOURCE_CLASSES
    )
    weight, _ = _head(model)
    assert torch.equal(weight[0], source[f"{HEAD}.weight"][1])
    assert report["kept_classes"] == ["pneumonia"]
    with pytest.raises(WeightsError, match="3 outputs but 2 source classes"):
        init_from_source(_fresh(2), ARCH, ["a", "b"], str(tmp_path / "ckpt.pth"), source_classes=["a", "b"])


def test_wrong_architecture_refused(tmp_path, source_artifact):
    directory, _ = source_artifact
    with pytest.raises(WeightsError, match="same architecture"):
        init_from_source(build_model("resnet50", 2), "resnet50", ["a", "b"], str(directory))
    torch.save(build_model("resnet50", 2).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(WeightsError, match="no tensor matches"):
        init_from_source(_fresh(2), ARCH, ["a", "b"], str(tmp_path / "resnet.pt"))


def _step(model: nn.Module, groups: list[dict], arch: str, mode: str) -> None:
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9)
    set_train_mode(model, arch, mode)
    images = torch.randn(4, 1, 64, 64)
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 0, 1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_frozen_mode_keeps_backbone_and_bn_stats():
    model = _fresh(2)
    groups = configure_mode(model, ARCH, "frozen", lr=0.1)
    assert [g["name"] for g in groups] == ["head"] and groups[0]["lr"] == 0.1
    head = model.get_submodule(HEAD)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in head.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, groups, ARCH, "frozen")
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(HEAD):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # weights AND running stats unchanged
    assert model.training and all(
        not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_finetune_last_blocks():
    model = _fresh(2)
    spec = get_arch(ARCH)
    blocks = backbone_blocks(model, spec)
    groups = configure_mode(model, ARCH, "finetune", lr=0.01, backbone_lr_factor=0.1, finetune_blocks=2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 0.01 and by_name["backbone"]["lr"] == pytest.approx(0.001)
    trained = {id(p) for block in blocks[-2:] for p in block.parameters()}
    assert {id(p) for p in by_name["backbone"]["params"]} == trained
    head_ids = {id(p) for p in model.get_submodule(HEAD).parameters()}
    for param in model.parameters():
        assert param.requires_grad == (id(param) in trained or id(param) in head_ids)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, groups, ARCH, "finetune")
    after = model.state_dict()
    for key, value in before.items():
        index = int(key.split(".")[1]) if key.startswith("features.") else None
        if index is not None and index < len(blocks) - 2:
            assert torch.equal(after[key], value), key  # earlier blocks: weights and BN stats fixed
    assert not torch.equal(after["features.18.0.weight"], before["features.18.0.weight"])
    assert not torch.equal(after["features.18.1.running_mean"], before["features.18.1.running_mean"])
    assert not blocks[0][1].training and blocks[-1][1].training  # frozen BN eval, trained BN train


def test_finetune_last_block_resnet50():
    model = build_model("resnet50", 2)
    groups = configure_mode(model, "resnet50", "finetune", lr=1.0, finetune_blocks=1)
    backbone = next(g for g in groups if g["name"] == "backbone")
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.layer4.parameters()}
    assert not any(p.requires_grad for p in model.layer3.parameters())
    assert not model.conv1.weight.requires_grad


def test_scratch_and_full_finetune_groups():
    model = _fresh(3)
    configure_mode(model, ARCH, "frozen", lr=0.1)  # modes can be switched: requires_grad is reset
    groups = configure_mode(model, ARCH, "scratch", lr=0.05)
    assert len(groups) == 1 and groups[0]["lr"] == 0.05
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    groups = configure_mode(model, ARCH, "finetune", lr=0.05, backbone_lr_factor=0.2)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({"backbone": 0.01, "head": 0.05})
    torch.optim.AdamW(groups)  # valid optimizer param groups
    set_train_mode(model, ARCH, "finetune")
    assert all(m.training for m in model.modules())


def test_mode_errors():
    model = _fresh(2)
    with pytest.raises(ValueError, match="valid: scratch, frozen, finetune"):
        configure_mode(model, ARCH, "linear_probe", lr=0.1)
    with pytest.raises(ValueError, match="finetune_blocks must be 1..19"):
        configure_mode(model, ARCH, "finetune", lr=0.1, finetune_blocks=0)
    with pytest.raises(ValueError, match="finetune_blocks applies"):
        configure_mode(model, ARCH, "frozen", lr=0.1, finetune_blocks=2)
