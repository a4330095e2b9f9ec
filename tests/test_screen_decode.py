"""``--decode gpu|cpu|auto`` in screening, without a GPU: the layout it asks for, the refusals, the
CPU fallback with its reason in every row, and the device decode stage run on CPU tensors (with
Pillow as the codec) giving the rows and numbers of the CPU decode stage."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pytest
import torch
from _screen_testing import CLASSES, make_archive, make_artifact

from cxr_ray.commands.screen import add_arguments, config_from_args
from cxr_ray.errors import BackendUnavailableError, UsageError
from cxr_ray.io.gpu.codec import PillowCodec, nvimgcodec_available
from cxr_ray.io.gpu.decode import CPU_NOTE, GpuDecoder, open_gpu_decoder
from cxr_ray.io.inputs import InputPolicy
from cxr_ray.models.artifact import load_card
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.device_decode import decode_on_device
from cxr_ray.screen.resources import plan_layout
from cxr_ray.screen.schema import META_COLUMNS, prob_column
from cxr_ray.screen.stages import Predictor, decode_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the CPU-only answer differs")
GPU_CLUSTER = {"CPU": 16.0, "GPU": 2.0}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("archive"), n=24, corrupt_fraction=0.3, seed=5, size=160)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("model") / "model")


def config(**fields) -> ScreenConfig:
    return ScreenConfig(model="m", inputs=["i"], output="o", **fields)


def test_decode_choices_from_the_cli():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--decode", "gpu"])
    assert config_from_args(args).decode == "gpu"
    assert parser.parse_args(["--model", "m", "--input", "i", "--output", "o"]).decode == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--decode", "npu"])
    with pytest.raises(UsageError, match="decode must be one of auto, cpu, gpu"):
        config(decode="npu")


def test_layout_per_decode_mode():
    gpu = plan_layout(config(decode="gpu"), GPU_CLUSTER)
    assert gpu.decode_on_gpu and gpu.decode_in_actors and gpu.decode_cpus == 0.0 and gpu.gpus_per_actor == 1.0
    cpu = plan_layout(config(decode="cpu"), GPU_CLUSTER)
    assert not cpu.decode_on_gpu and not cpu.decode_in_actors and cpu.decode_cpus == 1.0
    auto = plan_layout(config(decode="auto"), GPU_CLUSTER)
    assert auto.decode_on_gpu == nvimgcodec_available() and auto.decode_in_actors == nvimgcodec_available()
    assert not plan_layout(config(decode="auto"), {"CPU": 8.0}).decode_on_gpu  # no GPUs: the CPU actors decode
    with pytest.raises(UsageError, match="--decode gpu decodes in the GPU predict actors"):
        plan_layout(config(decode="gpu"), {"CPU": 8.0})
    with pytest.raises(UsageError, match="has none"):
        plan_layout(config(decode="gpu", gpus_per_actor=0), GPU_CLUSTER)


@NO_GPU
def test_open_gpu_decoder_per_mode():
    assert open_gpu_decoder("cpu", InputPolicy()) == (None, None)
    decoder, why = open_gpu_decoder("auto", InputPolicy())
    assert decoder is None and "needs a CUDA GPU" in why
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        open_gpu_decoder("gpu", InputPolicy())


def _decode_kwargs(artifact) -> dict:
    return {"preprocessing": dict(load_card(artifact).preprocessing), "pseudonym_key": b"k"}


@NO_GPU
def test_gpu_decode_actor_refuses_at_start_and_auto_says_why_in_each_row(artifact, archive):
    kwargs = _decode_kwargs(artifact)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        Predictor(artifact, "onnxruntime", run_id="g", device="cpu", num_threads=1, decode=kwargs, decode_on="gpu")
    table = pa.table({"path": list(archive["uri"])})
    auto = Predictor(artifact, "onnxruntime", run_id="a", device="cpu", num_threads=1, decode=kwargs, decode_on="auto")
    cpu = Predictor(artifact, "onnxruntime", run_id="a", device="cpu", num_threads=1, decode=kwargs, decode_on="cpu")
    got, expected = auto(table).to_pandas(), cpu(table).to_pandas()
    probs = [prob_column(c) for c in CLASSES]
    np.testing.assert_array_equal(got[probs].to_numpy(), expected[probs].to_numpy())
    for ours, theirs in zip(got["warnings"], expected["warnings"], strict=True):
        assert list(ours[:-1]) == list(theirs) and ours[-1].startswith(CPU_NOTE + "GPU decoding needs a CUDA GPU")


def test_device_decode_stage_gives_the_cpu_stages_rows(artifact, archive):
    kwargs = _decode_kwargs(artifact)
    size = load_card(artifact).image_size
    decoder = GpuDecoder(InputPolicy(target_size=size, pseudonym_key=b"k"), codec=PillowCodec("cpu"))
    paths = [*archive["uri"], str(archive["uri"].iloc[0]) + ".missing"]
    meta, pixels = decode_on_device(pa.table({"path": paths}), decoder, kwargs["preprocessing"])
    expected = decode_batch(pa.table({"path": paths}), **kwargs)
    for column in META_COLUMNS:
        if column == "warnings":  # the device stage adds "decoded on the CPU: ..." where it fell back
            for ours, theirs in zip(meta.column(column).to_pylist(), expected.column(column).to_pylist(), strict=True):
                assert [w for w in ours if not w.startswith(CPU_NOTE)] == theirs
        else:
            assert meta.column(column).to_pylist() == expected.column(column).to_pylist(), column
    cpu_pixels = np.asarray(expected.column("pixels").combine_chunks().flatten()).reshape(pixels.shape)
    ok = np.asarray(meta.column("status").to_pylist()) == "ok"
    assert ok.sum() > 10 and not pixels.numpy()[~ok].any()
    # decoded at full size and box-reduced (vs DCT-scaled / wavelet-reduced on the CPU): close, not equal
    assert float(np.abs(pixels.numpy()[ok] - cpu_pixels[ok]).mean()) < 0.02


def test_predictor_with_a_device_decoder_predicts_like_the_cpu_stage(artifact, archive):
    kwargs = _decode_kwargs(artifact)
    table = pa.table({"path": list(archive["uri"])})
    cpu = Predictor(artifact, "torch", run_id="c", device="cpu", num_threads=1, decode=kwargs, decode_on="cpu")
    on_device = Predictor(artifact, "torch", run_id="d", device="cpu", num_threads=1, decode=kwargs, decode_on="cpu")
    on_device.gpu_decoder = GpuDecoder(InputPolicy(target_size=load_card(artifact).image_size, pseudonym_key=b"k"),
                                       codec=PillowCodec("cpu"))  # the GPU actor's stage, on CPU tensors
    got, expected = on_device(table).to_pandas(), cpu(table).to_pandas()
    assert got["status"].tolist() == expected["status"].tolist()
    assert got["error_code"].tolist() == expected["error_code"].tolist()
    ok = (got["status"] == "ok").to_numpy()
    probs = [prob_column(c) for c in CLASSES]
    assert float(np.abs(got[probs].to_numpy()[ok] - expected[probs].to_numpy()[ok]).max()) < 0.05
