"""``cxr-ray bench gpu`` on the CPU (``--device cpu``, a dry run): it runs without Ray or the other
packages a bare GPU machine lacks, and prints one JSON document of the documented shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_ray.commands.bench import SUITES, parse_suite

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the device machine does not have (pydicom and pylibjpeg travel as wheels): none may be imported.
ABSENT_THERE = ("ray", "pydantic", "fastapi", "starlette", "s3fs", "botocore", "aiobotocore", "captum",
                "multipart", "moto", "duckdb")
DRY_RUN = ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-sizes", "1,2",
           "--seconds", "0.01", "--warmup", "1", "--phantoms", "1", "--phantom-size", "128", "--decode-files", "4",
           "--decode-batch", "2", "--e2e-files", "6", "--e2e-batch", "3", "--rounds", "1", "--real-limit", "4"]
BLOCKER = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_THERE!r}:
            raise ImportError(f"{{name}} is not on the device machine")
sys.meta_path.insert(0, Absent())
import torch; torch.set_num_threads(1)
from cxr_ray.bench.gpu import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory, real_data_dir):
    out = tmp_path_factory.mktemp("bench-gpu") / "report.json"
    done = subprocess.run([sys.executable, "-c", BLOCKER, *DRY_RUN, "--input", str(real_data_dir), "--output", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # stdout is the one JSON document, nothing else
    assert printed == json.loads(out.read_text())
    return printed


def test_suite_is_listed_and_parses():
    assert "gpu" in SUITES
    module, args = parse_suite("gpu", ["--device", "cpu", "--batch-sizes", "1,32"])
    assert module.__name__ == "cxr_ray.bench.gpu" and args.batch_sizes == [1, 32]
    with pytest.raises(SystemExit):
        parse_suite("gpu", ["--batch-sizes", "0"])


def test_dry_run_report_shape(report):
    assert report["bench"] == "gpu" and report["schema_version"] == 1 and report["measured_on_gpu"] is False
    assert report["complete"] is True
    assert {"requested", "kind", "name", "torch", "cuda_available", "onnxruntime_providers",
            "nvimgcodec_installed", "tensorrt_installed"} <= set(report["device"])
    assert report["device"]["kind"] == "cpu" and report["model"] == {"arch": "resnet18", "image_size": 32,
                                                                      "weights": "random (seeded)"}
    assert isinstance(report["elapsed_s"], float)


def test_dry_run_engine_rows(report):
    rows, skipped = report["engines"]["rows"], report["engines"]["skipped"]
    variants = {r["variant"] for r in rows}
    assert {"torch-cpu-fp32-nchw", "torch-cpu-fp32-cl"} <= variants
    for row in rows:
        assert row["batch_size"] in (1, 2) and row["images_per_s"] > 0 and row["iterations"] >= 2
        assert 0 <= row["max_abs_diff_vs_cpu_fp32"] < 0.05
    assert next(r for r in rows if r["variant"] == "torch-cpu-fp32-nchw")["max_abs_diff_vs_cpu_fp32"] == 0.0
    reasons = {s["variant"]: s["reason"] for s in skipped}
    assert "CUDA graphs need a CUDA device" in reasons["torch-cuda-fp16-cl-graphs"]


def test_dry_run_decode_and_end_to_end(report):
    decode = report["decode"]
    assert decode["codec"] == "pillow"  # the CPU stand-in for nvImageCodec: a dry run, no GPU figure
    assert {"phantom_jpeg2000_dicom", "phantom_jpeg_dicom", "real_files"} <= set(decode["sets"])
    for figures in decode["sets"].values():
        assert figures["files"] == 4 and figures["cpu_files_per_s_one_core"] > 0 and figures["gpu_files_per_s"] > 0
        assert figures["compared"] >= 1 and figures["max_abs_diff"] >= figures["mean_abs_diff"] >= 0
    assert "htj2k" in report["inputs"]["phantoms_not_written"]  # written by nvImageCodec's encoder only
    for mode in ("gpu", "cpu"):
        e2e = report["end_to_end"][f"{mode}_decode"]
        assert e2e["decode"] == mode and e2e["files"] == 6 and e2e["statuses"] == {"ok": 6} and e2e["images_per_s"] > 0
    assert report["targets"]["evaluated"] is False and "H100" in report["targets"]["reason"]


def test_targets_are_judged_only_on_an_h100():
    from cxr_ray.bench.gpu import targets

    def row(variant, size, rate):
        return {"variant": variant, "batch_size": size, "images_per_s": rate}

    report = {
        "device": {"name": "NVIDIA H100 80GB HBM3"},
        "engines": {"rows": [row("torch-cuda-fp32-cl", 128, 1900.0), row("torch-cuda-fp16-cl", 128, 3900.0),
                             row("torch-cuda-fp16-cl-graphs", 128, 4100.0)]},
        "decode": {"sets": {"phantom_jpeg2000_dicom": {"ratio_gpu_vs_one_core": 12.0},
                            "phantom_jpeg_dicom": {"ratio_gpu_vs_one_core": 9.5}, "real_files": {"ratio_gpu_vs_one_core": 1}}},
        "end_to_end": {"gpu_decode": {"images_per_s": 1600.0}},
    }
    assert targets(report) == {"evaluated": True, "densenet121_fp16_b128_ge_4000": True, "fp16_ge_2x_fp32_b128": True,
                               "gpu_decode_phantom_ge_10x_one_core": False, "end_to_end_ge_1500": True}
    report["end_to_end"] = {"gpu_decode": {"error": "BackendUnavailableError: ..."}}
    assert targets(report)["end_to_end_ge_1500"] is None  # not measured: neither true nor false
    report["device"]["name"] = "NVIDIA H200"
    assert targets(report)["evaluated"] is False
