"""``cxr-ray bench decode`` on a few tiny generated files: JSON shape and positive figures.
Timings are never asserted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_decode_dicom import make_dicom, ramp

from cxr_ray.bench.decode import bench_decode
from cxr_ray.cli import main
from cxr_ray.commands.bench import SUITES, available_suites


@pytest.fixture()
def tiny_archive(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "nested").mkdir()
    for index in range(2):
        grey = rng.integers(0, 256, (40, 48), dtype=np.uint8)
        for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
            buffer = io.BytesIO()
            Image.fromarray(grey).save(buffer, fmt)
            (tmp_path / f"img{index}.{suffix}").write_bytes(buffer.getvalue())
        (tmp_path / "nested" / f"im{index}").write_bytes(make_dicom(ramp(40, 48), bits_stored=12))
    (tmp_path / "labels.txt").write_text("not an image\n")
    (tmp_path / "nested" / "lateral.dcm").write_bytes(make_dicom(view="LL"))
    return tmp_path


def test_bench_decode_json_shape(tiny_archive, capsys):
    assert (
        main(["bench", "decode", "--input", str(tiny_archive), "--size", "16", "--rounds", "1"])
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["bench"] == "decode" and result["size"] == 16
    # stderr: one line per step as it starts (cxr_ray.progress), then how long the suite took
    steps = [line for line in captured.err.splitlines() if line.startswith("bench decode: ")]
    assert any(line.startswith("bench decode: round 1/1: ") for line in steps)
    assert steps[-1].startswith("bench decode: done in ")
    assert "process_time" in result["clock"]
    assert set(result["formats"]) == {"dicom", "png", "jpeg"}
    for figures in [*result["formats"].values(), result["overall"]]:
        assert figures["ours_files_per_s"] > 0 and figures["baseline_files_per_s"] > 0
        assert figures["ratio"] > 0
    assert result["formats"]["dicom"]["files"] == 2  # the lateral view is excluded, and listed
    assert result["overall"]["files"] == 6
    deadline = result["deadline"]  # the decode deadline's cost, measured on the same files
    assert deadline["files"] == 6 and deadline["max_decode_seconds"] > 0
    assert deadline["with_ms_per_file"] > 0 and deadline["without_ms_per_file"] > 0
    assert isinstance(deadline["overhead_pct_wall"], float)
    # the fastest round and the median of at least 9 interleaved rounds, on both clocks
    assert deadline["rounds"] >= 9
    for key in ("overhead_pct_cpu", "overhead_pct_wall_median", "overhead_pct_cpu_median"):
        assert isinstance(deadline[key], float), key
    assert deadline["handoff_us_per_file"] > 0  # the mechanism's floor: a hand-off around a no-op
    assert result["excluded"] == [
        {"path": "nested/lateral.dcm", "format": "dicom", "failed": "ours", "error": "lateral_view"}
    ]
    assert result["skipped_not_images"] == 1


def test_bench_decode_limit_per_format(tiny_archive):
    result = bench_decode(tiny_archive, size=8, limit=1, rounds=1)
    assert {fmt: f["files"] for fmt, f in result["formats"].items()} == {
        "dicom": 1,
        "png": 1,
        "jpeg": 1,
    }


def test_bench_usage_errors_exit_2(tmp_path, capsys):
    assert main(["bench", "decode", "--input", str(tmp_path / "missing")]) == 2
    assert main(["bench", "decode", "--input", str(tmp_path)]) == 2  # no images in it
    assert "no DICOM, PNG or JPEG" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["bench"])
    assert info.value.code == 2


def test_decode_suite_is_registered():
    assert "decode" in SUITES
    assert "decode" in available_suites()
