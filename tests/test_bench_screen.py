"""``cxr-ray bench screen`` runs end to end on tiny inputs and reports every figure (no timing asserted)."""

from __future__ import annotations

import argparse
import json

import pytest
from _screen_testing import make_archive

from cxr_ray.bench import screen as bench_screen
from cxr_ray.engines.openvino.runtime import openvino_available


def _run(argv: list[str], capsys) -> dict:
    parser = argparse.ArgumentParser(prog="cxr-ray bench")
    bench_screen.add_parser(parser.add_subparsers(dest="suite"))
    args = parser.parse_args(["screen", *argv])
    assert bench_screen.run(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-archive")
    make_archive(root, n=12, corrupt_fraction=0.0, seed=21, size=96)
    return root


def test_bench_screen_reports_bound_job_baseline_and_ratios(ray_cluster, archive, tmp_path, capsys):
    report = _run(
        ["--arch", "mobilenet_v2", "--image-size", "64", "--input", str(archive / "images"), "--limit", "10",
         "--batch-size", "4", "--decode-batch-size", "4", "--decode-sample", "4", "--backend-batches", "1",
         "--actors", "1,1", "--work-dir", str(tmp_path)],
        capsys,
    )
    assert report["inputs"] == 10 and report["cores"] >= 1
    assert report["decode"]["core_s_per_image"] > 0 and report["decode"]["ok"] == 4
    engines = {"onnxruntime", "torch"} | ({"openvino"} if openvino_available() else set())
    assert report["best_backend"] in engines
    assert set(report["backends"]) == engines  # OpenVINO, what --backend auto picks first, is in the bound
    assert report["bound_images_per_s"] > 0
    assert report["ray_job"]["images"] == 10 and report["ray_job"]["status"]["ok"] == 10
    assert report["baseline"]["images"] == 10 and report["baseline"]["images_per_s"] > 0
    assert set(report["ratios"]) >= {"ray_job_vs_bound", "ray_job_vs_baseline"}


def test_bench_screen_memory_check(ray_cluster, tmp_path, capsys):
    report = _run(
        ["--arch", "mobilenet_v2", "--image-size", "64", "--memory-check", "--memory-sizes", "20,40",
         "--batch-size", "8", "--actors", "1,1", "--work-dir", str(tmp_path)],
        capsys,
    )
    runs = report["memory"]["runs"]
    assert [r["inputs"] for r in runs] == [20, 40] and [r["rows"] for r in runs] == [20, 40]
    assert all(r["peak_pss_mib"] > 0 for r in runs)
    assert "growth" in report["memory"]
