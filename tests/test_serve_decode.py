"""``decode`` in serving without a GPU: the config's rules, the CLI flag, the request decoder per
mode (CPU path as before; the GPU path on CPU tensors with Pillow as the codec) and the batched
model stage taking device tensors."""

from __future__ import annotations

import asyncio
import typing

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cxr_ray.errors import BackendUnavailableError, DecodeError
from cxr_ray.io.gpu.codec import PillowCodec
from cxr_ray.io.gpu.decode import GpuDecoder
from cxr_ray.io.gpu.mode import DECODE_MODES
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.preprocess import PreprocessConfig, preprocess
from cxr_ray.serve.config import DecodeName, ServeArgs
from cxr_ray.serve.decoding import RequestDecoder, host_pixels

CONFIG = PreprocessConfig(image_size=64)
READING = InputPolicy(target_size=64)


def test_config_rules():
    assert typing.get_args(DecodeName) == DECODE_MODES and ServeArgs(model="m").decode == "auto"
    assert ServeArgs(model="m", decode="gpu").decode == "gpu"
    with pytest.raises(ValidationError, match="decode=gpu decodes on the model's GPU"):
        ServeArgs(model="m", decode="gpu", topology="split")
    with pytest.raises(ValidationError, match="decode"):
        ServeArgs(model="m", decode="tpu")


def test_cli_flag(tmp_path):
    from cxr_ray.cli import build_parser
    from cxr_ray.commands.serve import build_args

    parser, _ = build_parser()
    assert build_args(parser.parse_args(["serve", "--model", str(tmp_path), "--decode", "gpu"])).decode == "gpu"
    assert build_args(parser.parse_args(["serve", "--model", str(tmp_path)])).decode == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", str(tmp_path), "--decode", "fpga"])


def test_cpu_and_auto_without_a_gpu_model_decode_as_before(real_data_dir):
    data = (real_data_dir / "rsna-pneumonia-sample-monochrome1.dcm").read_bytes()
    expected = load_input("request", READING, data=data, name="request r1").image
    for mode in ("cpu", "auto"):
        decoder = RequestDecoder(mode, READING, CONFIG)
        assert not decoder.on_gpu and decoder.note is None  # the model is on the CPU: nothing to say
        tensor, meta, pixels = decoder.decode(data, "request r1")
        np.testing.assert_array_equal(tensor, preprocess(expected.pixels, CONFIG))
        assert meta == expected.meta and host_pixels(pixels) is pixels
    with pytest.raises(DecodeError) as refused:
        RequestDecoder("cpu", READING, CONFIG).decode(data[:3000], "request r2")
    assert refused.value.code == "truncated" and "request r2" in refused.value.message


def test_gpu_decoding_needs_the_model_on_a_gpu():
    with pytest.raises(BackendUnavailableError, match="this replica's model runs on the CPU"):
        RequestDecoder("gpu", READING, CONFIG)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the CPU-only answer differs")
def test_gpu_and_auto_on_a_gpu_model_without_cuda_here():
    # A model said to be on a GPU, on a machine without one: gpu refuses, auto says why in every response.
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        RequestDecoder("gpu", READING, CONFIG, torch.device("cuda", 0))
    auto = RequestDecoder("auto", READING, CONFIG, torch.device("cuda", 0))
    assert not auto.on_gpu and auto.note.startswith("decoded on the CPU: GPU decoding needs a CUDA GPU")


def test_the_gpu_path_of_a_request_on_cpu_tensors(real_data_dir):
    data = (real_data_dir / "rsna-pneumonia-sample.dcm").read_bytes()
    decoder = RequestDecoder("cpu", READING, CONFIG)
    decoder.gpu = GpuDecoder(READING, codec=PillowCodec("cpu"))  # what a GPU replica holds, on CPU tensors
    tensor, meta, pixels = decoder.decode(data, "request r3")
    cpu_tensor, cpu_meta, _ = RequestDecoder("cpu", READING, CONFIG).decode(data, "request r3")
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (1, 64, 64) and meta == cpu_meta
    assert float(np.abs(tensor.numpy() - cpu_tensor).mean()) < 0.05  # full decode + box vs 1/4 DCT scale
    assert isinstance(host_pixels(pixels), np.ndarray)


def test_batched_model_stage_takes_device_tensors(tmp_path):
    from _serve_testing import make_artifact

    from cxr_ray.serve.predictor import CxrPredictor

    artifact = make_artifact(tmp_path / "a")
    predictor = CxrPredictor.func_or_class(ServeArgs(model=str(artifact), backend="torch", device="cpu").model_dump())
    size = predictor.card.image_size
    image = np.random.default_rng(0).standard_normal((1, size, size), dtype=np.float32)

    async def both():
        return await predictor.predict(torch.from_numpy(image)), await predictor.predict(image)

    from_tensor, from_array = asyncio.run(both())
    np.testing.assert_allclose(from_tensor["probabilities"], from_array["probabilities"], atol=1e-6)
    assert from_tensor["label"] == from_array["label"]
