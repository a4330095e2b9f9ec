"""``cxr-ray bench backends``: report structure (timings are measured, never asserted)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from cxr_ray.bench import backends as bench
from cxr_ray.errors import UsageError
from cxr_ray.testing import make_artifact

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared 2-core box


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cxr-ray bench")
    bench.add_parser(parser.add_subparsers(dest="bench_verb"))
    return parser.parse_args(["backends", *argv])


FAST = ("--batch-sizes", "1,3", "--seconds", "0.05", "--warmup", "0", "--threads", "1")


def assert_rounded_ratio(reported: float, rate: float, base_rate: float) -> None:
    """The report rounds rates and ratios to 2 decimals, so allow exactly that rounding.

    A relative tolerance is wrong for small ratios: emulated bf16 on a CPU without
    AVX-512 reports 0.13 for a true 0.1334 (2.5% off, yet correctly rounded).
    """
    recomputed = rate / base_rate
    # half a unit in the ratio's last place, plus what rounding each rate can move the quotient
    slack = 0.005 + recomputed * 0.005 * (1 / rate + 1 / base_rate) + 1e-9
    assert abs(reported - recomputed) <= slack, (reported, rate, base_rate)


def check_report(report: dict, batch_sizes: list[int]) -> None:
    assert report["baseline"] == bench.BASELINE == "torch-eager-nchw-fp32"
    names = {row["backend"] for row in report["results"]}
    assert {"torch-eager-nchw-fp32", "torch-eager-cl-fp32", "onnxruntime-cpu-fp32"} <= names
    for size in batch_sizes:
        rows = [row for row in report["results"] if row["batch_size"] == size]
        assert len(rows) == len(names)
        base = next(row for row in rows if row["backend"] == bench.BASELINE)
        assert base["ratio_vs_baseline"] == 1.0
        for row in rows:
            assert row["images_per_s"] > 0 and row["iterations"] >= 2
            assert_rounded_ratio(row["ratio_vs_baseline"], row["images_per_s"], base["images_per_s"])
            if row["fp32_equivalent"]:
                assert row["max_abs_diff_vs_baseline"] <= 1e-4  # fast AND the same numbers
        best = report["best"][str(size)]
        assert best["images_per_s"] == max(row["images_per_s"] for row in rows if row["fp32_equivalent"])
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] == torch.__version__ and machine["device"] == "cpu"
    assert {"onnxruntime", "tensorrt", "available_cpus"} <= set(machine)


def test_bench_random_arch(capsys):
    assert bench.run(parse("--arch", "mobilenet_v2", "--image-size", "64", "--bf16", *FAST)) == 0
    report = json.loads(capsys.readouterr().out)
    bf16 = [row for row in report["results"] if row["backend"] == "torch-eager-cl-bf16"]
    assert len(bf16) == 2 and not any(row["fp32_equivalent"] for row in bf16)
    lower = {row["backend"] for row in report["results"] if not row["fp32_equivalent"]}  # torch / OpenVINO bf16
    assert lower <= {"torch-eager-cl-bf16", "openvino-cpu-bf16"}
    assert all(entry["backend"] in lower for entry in report["best_lower_precision"].values())
    assert report["model"]["arch"] == "mobilenet_v2" and report["model"]["source"] == "random-init"
    assert report["model"]["image_size"] == 64
    check_report(report, [1, 3])


def test_bench_artifact_subset_and_output_file(tmp_path, capsys):
    root = make_artifact(tmp_path / "m", classes=["a", "b"], name="b", onnx=True)
    out = tmp_path / "report.json"
    args = parse("--model", str(root), "--backends", "onnxruntime-cpu-fp32", "--output", str(out), "--rounds", "2",
                 *FAST)
    assert bench.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    assert report["model"]["source"] == "artifact" and report["settings"]["rounds"] == 2
    assert {row["backend"] for row in report["results"]} == {bench.BASELINE, "onnxruntime-cpu-fp32"}

    with pytest.raises(UsageError, match="takes 64 px"):
        bench.run(parse("--model", str(root), "--image-size", "224", *FAST))
    with pytest.raises(UsageError, match="unknown backends"):
        bench.run(parse("--model", str(root), "--backends", "tensorflow", *FAST))


def test_parser_requires_exactly_one_source():
    with pytest.raises(SystemExit):
        parse("--batch-sizes", "1")
    with pytest.raises(SystemExit):
        parse("--arch", "resnet50", "--model", "x")
    with pytest.raises(SystemExit):
        parse("--arch", "resnet50", "--batch-sizes", "0,4")
    assert parse("--arch", "resnet50").batch_sizes == [1, 8, 32, 128]
