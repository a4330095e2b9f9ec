"""Weights files: safe loading, container unwrapping, s3://, ImageNet sources."""

from __future__ import annotations

import collections
import socket
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from cxr_ray.errors import CxrRayError
from cxr_ray.models.build import build_model
from cxr_ray.models.registry import get_arch
from cxr_ray.models.weights import (
    WeightsDownloadError,
    WeightsError,
    imagenet_state_dict,
    load_state_dict,
)


def _tensors() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.randn(4), "fc.weight": torch.randn(2, 4)}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_safetensors_and_torch_files(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    torch.save(tensors, tmp_path / "w.pt")
    _assert_same(load_state_dict(str(tmp_path / "w.safetensors")), tensors)
    _assert_same(load_state_dict(str(tmp_path / "w.pt")), tensors)
    torch.save(tensors, tmp_path / "no_extension")  # recognised by content
    _assert_same(load_state_dict(str(tmp_path / "no_extension")), tensors)


def test_containers_and_ddp_prefix_unwrapped(tmp_path):
    tensors = _tensors()
    ddp = {f"module.{k}": v for k, v in tensors.items()}
    torch.save({"epoch": 7, "state_dict": ddp, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    torch.save({"model": collections.OrderedDict(tensors)}, tmp_path / "model.bin")
    _assert_same(load_state_dict(str(tmp_path / "ckpt.pth")), tensors)
    _assert_same(load_state_dict(str(tmp_path / "model.bin")), tensors)


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""

    def __init__(self):
        self.value = 42


def test_pickled_object_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused to load") as info:
        load_state_dict(str(tmp_path / "evil.pt"))
    assert isinstance(info.value, CxrRayError)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled nn.Module
    with pytest.raises(WeightsError, match="refused to load"):
        load_state_dict(str(tmp_path / "module.pt"))


def test_bad_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(WeightsError, match="safetensors"):
        load_state_dict(str(tmp_path / "junk.safetensors"))
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match="no tensors"):
        load_state_dict(str(tmp_path / "empty.pt"))
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(str(tmp_path / "missing.pt"))


def test_s3_weights(s3_bucket, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").upload_file(
        str(tmp_path / "w.safetensors"), bucket, "weights/w.safetensors"
    )
    _assert_same(load_state_dict(f"s3://{bucket}/weights/w.safetensors", s3_endpoint=endpoint), tensors)


def test_imagenet_state_dict_from_file_feeds_build_model(tmp_path):
    reference = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(reference, tmp_path / "mobilenet_v2_imagenet.pth")
    state = imagenet_state_dict("mobilenet_v2", str(tmp_path / "mobilenet_v2_imagenet.pth"))
    model = build_model("mobilenet_v2", 3, imagenet_state_dict=state)
    got = model.state_dict()
    assert torch.equal(got["features.0.0.weight"], reference["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["features.18.0.weight"], reference["features.18.0.weight"])
    assert torch.equal(got["features.5.conv.1.1.running_var"], reference["features.5.conv.1.1.running_var"])
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_one_channel_model_is_not_imagenet(tmp_path):
    torch.save(build_model("mobilenet_v2", 3).state_dict(), tmp_path / "cxr.pt")
    with pytest.raises(WeightsError, match="--init-from"):
        imagenet_state_dict("mobilenet_v2", str(tmp_path / "cxr.pt"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.mark.parametrize("arch", ["mobilenet_v2", "xception"])
def test_imagenet_download_fails_fast_offline(arch, tmp_path, monkeypatch):
    # An empty weights cache and an unreachable proxy: no download can succeed,
    # whether or not this machine has network access.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert get_arch(arch).source in ("torchvision", "timm")
    start = time.perf_counter()
    with pytest.raises(WeightsDownloadError) as info:
        imagenet_state_dict(arch, "imagenet")
    assert time.perf_counter() - start < 10
    assert "no network access to download ImageNet weights; pass --pretrained PATH_OR_URI" in str(info.value)
    assert isinstance(info.value, CxrRayError)
