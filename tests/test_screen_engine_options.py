"""The "engine" flags (--calibration, --verify-labels, --max-prob-diff, ...) of screen / serve / listen, from
the command line to every backend those surfaces load: real OpenVINO (and NNCF for int8), real local Ray.

The OpenVINO runs are skipped, with the reason, where ``openvino`` / ``nncf`` are not installed.
"""

from __future__ import annotations

import pytest
from _screen_testing import make_archive, make_artifact, read_rows

from cxr_ray.cli import build_parser
from cxr_ray.commands.screen import config_from_args
from cxr_ray.engines.openvino.runtime import openvino_available
from cxr_ray.errors import UsageError
from cxr_ray.screen.job import run_screen

needs_openvino = pytest.mark.skipif(not openvino_available(),
                                    reason="openvino is not installed (pip install 'cxr-ray[openvino]')")
# Small and fast, as tests/_screen_testing.screen_config: one actor, small batches.
FAST = ["--batch-size", "4", "--decode-batch-size", "4", "--actors", "1", "--progress-every", "0"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("engine-model") / "model")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Six readable phantoms and their labels.csv (the inputs, and the int8 calibration / labelled set)."""
    root = tmp_path_factory.mktemp("engine-phantoms")
    make_archive(root, n=6, corrupt_fraction=0.0, seed=7)
    return str(root / "labels.csv")


def screen_args(artifact: str, inputs: str, output, *flags: str):
    parser, _ = build_parser()
    args = parser.parse_args(["screen", "--model", artifact, "--input", inputs, "--output", str(output), *FAST, *flags])
    return config_from_args(args)


def test_the_engine_flags_reach_the_config_and_its_engine_options(artifact, phantoms, tmp_path):
    config = screen_args(artifact, phantoms, tmp_path, "--calibration", phantoms, "--calibration-images", "5",
                         "--verify-labels", phantoms, "--verify-images", "3", "--max-prob-diff", "0.25")
    assert config.engine_options() == {"calibration": phantoms, "calibration_images": 5, "verify_labels": phantoms,
                                       "verify_images": 3, "max_prob_diff": 0.25}
    assert screen_args(artifact, phantoms, tmp_path).engine_options() == {
        "calibration": None, "calibration_images": 512, "verify_labels": None, "verify_images": 256,
        "max_prob_diff": None}  # EngineRequest's defaults
    parser, _ = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["screen", "--model", artifact, "--input", phantoms, "--output", str(tmp_path),
                           "--max-prob-diff", "-1"])


@needs_openvino
def test_cpu_int8_without_calibration_is_refused_before_ray_starts(artifact, phantoms, tmp_path):
    config = screen_args(artifact, phantoms, tmp_path / "out", "--backend", "openvino", "--precision", "int8")
    with pytest.raises(UsageError, match=r"--precision int8 on the CPU .openvino, NNCF. is calibrated on real images"
                                         r".*--calibration SPEC"):
        run_screen(config)
    assert not (tmp_path / "out" / "_summary.json").exists()


@needs_openvino
def test_screen_int8_openvino_calibrated_on_the_phantoms(ray_cluster, artifact, phantoms, tmp_path):
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'cxr-ray[openvino]')")
    out = tmp_path / "int8"
    # A random-initialised network is no test of int8 accuracy: the limit is loose (as in test_openvino);
    # what is tested is that the calibration and the limit reach the actor's engine.
    summary = run_screen(screen_args(artifact, phantoms, out, "--backend", "openvino", "--precision", "int8",
                                     "--calibration", phantoms, "--calibration-images", "4", "--max-prob-diff", "1"))
    rows = read_rows(out)
    assert summary["complete"] and summary["status"] == {"ok": 6, "error": 0, "skipped": 0}
    assert len(rows) == 6 and set(rows["status"]) == {"ok"} and set(rows["backend"]) == {"openvino-int8"}
    assert summary["backend"] == "openvino-int8"
    [engine] = summary["engines"]
    assert engine["backend"] == "openvino" and engine["precision"] == "int8"
    check = engine["verification"]
    assert check["reference"] == "onnxruntime" and check["atol"] == 1.0
    assert check["real_images"] == {"spec": phantoms, "images": 4} and 0.0 <= check["max_abs_diff"] <= 1.0


@needs_openvino
def test_max_prob_diff_zero_makes_auto_fall_back_to_onnxruntime(ray_cluster, artifact, phantoms, tmp_path):
    out = tmp_path / "auto"
    summary = run_screen(screen_args(artifact, phantoms, out, "--backend", "auto", "--max-prob-diff", "0"))
    assert summary["complete"] and summary["backend"] == "onnxruntime"
    assert set(read_rows(out)["backend"]) == {"onnxruntime"}
    assert [e["backend"] for e in summary["engines"]] == ["onnxruntime"]


@needs_openvino
def test_serve_flags_reach_the_predictor_backend(artifact, phantoms, tmp_path):
    """serve: flags -> ServeArgs -> the model deployment's class (outside Serve) -> load_backend."""
    from cxr_ray.commands.serve import build_args
    from cxr_ray.serve.predictor import CxrPredictor

    parser, _ = build_parser()
    serve_args = build_args(parser.parse_args(["serve", "--model", artifact, "--max-prob-diff", "0",
                                               "--verify-labels", phantoms, "--verify-images", "3"]))
    assert (serve_args.max_prob_diff, serve_args.verify_labels, serve_args.verify_images) == (0.0, phantoms, 3)
    predictor = CxrPredictor.func_or_class(serve_args.model_dump())
    assert predictor.backend.name == "onnxruntime"  # auto: OpenVINO refused at a limit of 0, as in screen
    opened = CxrPredictor.func_or_class(serve_args.model_copy(update={"max_prob_diff": 1.0}).model_dump())
    check = opened.backend.describe()["verification"]
    assert opened.backend.name == "openvino" and check["atol"] == 1.0
    assert check["real_images"] == {"spec": phantoms, "images": 3} and check["auc"]["images"] == 3
    assert opened.info()["verification"] == check and predictor.info()["verification"] is None  # GET /v1/model
