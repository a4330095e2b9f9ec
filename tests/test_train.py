"""``cxr-ray train`` / ``cxr-ray evaluate`` end to end on phantom X-rays: real Ray Train, real
Ray Data, real torch, real decode. One two-worker (DDP) training run is shared by the learning,
artifact and evaluate tests; the k-fold run is interrupted and resumed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr_ray import cli
from cxr_ray.models.artifact import load_model
from cxr_ray.synth import generate_archive

EPOCHS = 10
IMAGE_SIZE = 32  # the phantom files are 64 px; the model sees 32 px (fast on a CPU)


def run_cli(*argv: str) -> tuple[int, dict | None, str]:
    """(exit status, parsed stdout JSON or None, stderr) of one in-process CLI call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    text = out.getvalue()
    return code, (json.loads(text) if text.strip() else None), err.getvalue()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """240 phantom PNGs (~78 patients, 3 classes) + a few undecodable files + one duplicate."""
    root = tmp_path_factory.mktemp("phantoms")
    labels = generate_archive(str(root), n=240, formats=("png",), corrupt_fraction=0.03, seed=3, size=64)
    labels["label"] = labels["label"].fillna("normal")  # labelled, but undecodable: must be left out
    source = labels[~labels["corrupt"].astype(bool)].iloc[0]
    copy = "images/copy/duplicate.png"
    (root / copy).parent.mkdir(parents=True)
    shutil.copy(root / source["path"], root / copy)
    duplicate = source.copy()
    duplicate["path"], duplicate["patient_id"] = copy, "ANOTHER-SOURCE-0001"
    labels = pd.concat([labels, duplicate.to_frame().T], ignore_index=True)
    labels.to_csv(root / "labels.csv", index=False)
    return root, labels


@pytest.fixture(scope="module")
def trained(phantoms, ray_cluster, tmp_path_factory):
    root, labels = phantoms
    work = tmp_path_factory.mktemp("trained")
    out, storage = work / "model", work / "runs"
    code, summary, err = run_cli(
        "train", "--data", str(root / "labels.csv"), "--arch", "resnet18", "--mode", "scratch",
        "--epochs", str(EPOCHS), "--image-size", str(IMAGE_SIZE), "--batch-size", "16", "--no-augment", "--out", str(out),
        "--storage-path", str(storage), "--num-workers", "2", "--cpus-per-worker", "1", "--n-bootstrap", "200",
    )
    assert code == 0, err[-3000:]
    return summary, out, storage, labels


@pytest.mark.slow
def test_a_short_run_learns_and_writes_the_artifact(trained, phantoms):
    summary, out, _, labels = trained
    chance = 1 / 3
    assert summary["test"]["accuracy"] >= 0.7 > chance + 0.3  # held-out PATIENTS, 3 classes
    assert summary["test"]["n"] >= 30
    for name in ("model.safetensors", "model.json", "metrics.json", "roc.png", "confusion.png", "training_curves.png"):
        assert (out / name).is_file(), name

    card = json.loads((out / "model.json").read_text())
    assert card["arch"] == "resnet18" and card["classes"] == ["covid", "normal", "pneumonia"]
    assert card["positive_class"] == "covid" and card["image_size"] == IMAGE_SIZE
    assert card["thresholds"]["chosen_on"] == "validation"
    assert card["metrics"]["test"]["accuracy"] == summary["test"]["accuracy"]
    assert card["training"]["config"]["epochs"] == EPOCHS

    # undecodable files: reported by code, excluded, counted
    corrupt = labels[labels["corrupt"].astype(str) == "True"]
    assert summary["data"]["undecodable"] == corrupt["expected_error"].value_counts().to_dict()
    assert summary["data"]["decoded"] == len(labels) - len(corrupt)
    # the byte-identical copy (other patient id) is found, one copy kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["duplicates"]["duplicate_sets"] == 1
    assert summary["data"]["used"] == summary["data"]["decoded"] - 1
    # data fingerprint = sha256 of the sorted (content hash, label) pairs of the images used
    root = phantoms[0]
    used = labels[labels["corrupt"].astype(str) != "True"]
    pairs = {(hashlib.sha256((root / p).read_bytes()).hexdigest(), lab) for p, lab in zip(used["path"], used["label"], strict=True)}
    digest = hashlib.sha256("".join(f"{h}\t{lab}\n" for h, lab in sorted(pairs)).encode()).hexdigest()
    assert card["data_fingerprint"] == digest == summary["data"]["fingerprint"]

    history = metrics["history"]
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(history[0])
    assert metrics["test"]["binary"]["threshold"] == card["thresholds"]["positive"]  # val-chosen, applied to test

    # heatmaps.png: Grad-CAM of the predicted class on 2 validation images per class, a row per class
    assert "heatmaps.png" in summary["files"]
    grid = metrics["heatmaps"]
    assert grid["images"] == "validation images" and grid["method"] == "gradcam"
    assert grid["per_class"] == {"covid": 2, "normal": 2, "pneumonia": 2} and len(grid["cells"]) == 6
    assert [c["label"] for c in grid["cells"]] == ["covid", "covid", "normal", "normal", "pneumonia", "pneumonia"]
    assert all(c["explained"] == c["predicted"] for c in grid["cells"])
    with Image.open(out / "heatmaps.png") as image:
        image.load()
        assert image.format == "PNG"
        assert abs(image.size[0] - 520) <= 1 and abs(image.size[1] - 870) <= 1  # 2 columns x 3 rows of 2.6 x 2.9 in


@pytest.mark.slow
def test_artifact_round_trips_to_identical_outputs(trained):
    from cxr_ray.models.build import build_model
    from cxr_ray.train.epoch_state import load_state

    summary, out, storage, _ = trained
    model, card = load_model(str(out))
    again, card_again = load_model(str(out))
    run_dir = storage / summary["run"]["run_name"]
    checkpoint = max(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    trained_model = build_model("resnet18", 3)
    trained_model.load_state_dict(load_state(str(checkpoint))["best_model"])
    x = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained_model.eval()(x)
        assert torch.equal(model(x), expected)
        assert torch.equal(again(x), expected)
    assert card.version == card_again.version == summary["version"]


@pytest.mark.slow
def test_evaluate_writes_the_report_of_its_predictions(trained, ray_cluster, tmp_path):
    from cxr_ray.evaluate.calibration import expected_calibration_error
    from cxr_ray.evaluate.metrics import classification_report
    from cxr_ray.io.decode import decode_image
    from cxr_ray.preprocess import preprocess

    _, model_dir, _, _ = trained
    data = tmp_path / "new_patients"
    generate_archive(str(data), n=36, formats=("png", "dcm"), corrupt_fraction=0.05, seed=11, size=64)
    manifest = pd.read_csv(data / "labels.csv")
    manifest["label"] = manifest["label"].fillna("covid")
    manifest.to_csv(data / "labels.csv", index=False)
    code, summary, err = run_cli("evaluate", "--model", str(model_dir), "--data", str(data / "labels.csv"),
                                 "--out", str(tmp_path / "eval"), "--n-bootstrap", "100", "--group-by", "format")
    assert code == 0, err[-3000:]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(predictions) == summary["evaluated"] == int((~manifest["corrupt"].astype(bool)).sum())
    assert written["data"]["undecodable"]["count"] == int(manifest["corrupt"].astype(bool).sum())

    model, card = load_model(str(model_dir))
    probs = predictions[[f"prob_{c}" for c in card.classes]].to_numpy(np.float32)
    # the CIs resample PATIENTS: the manifest's patient ids are the bootstrap's clusters
    patient_of = {str(data / p): pid for p, pid in zip(manifest["path"], manifest["patient_id"], strict=True)}
    patients = predictions["path"].map(patient_of).to_numpy()
    assert not pd.isna(patients).any()
    labels = predictions["label"].to_numpy()
    expected = classification_report(labels, probs, card.classes, positive_class=card.positive_class,
                                     threshold=card.threshold, n_bootstrap=100, seed=0, groups=patients)
    report = dict(written["report"])
    calibration = report.pop("calibration")
    assert report == json.loads(json.dumps(expected))
    assert calibration["temperature"] == card.temperature
    label_index = np.array([card.classes.index(name) for name in labels])
    assert calibration["ece"] == pytest.approx(expected_calibration_error(probs, label_index), abs=1e-6)
    assert (tmp_path / "eval" / "reliability.png").is_file()

    # --group-by format: one report per value of that manifest column, on its own rows
    formats = predictions["path"].map(dict(zip((str(data / p) for p in manifest["path"]), manifest["format"],
                                               strict=True))).to_numpy()
    assert set(written["by_group"]["format"]) == set(formats) == {"png", "dicom"}
    for value, figures in written["by_group"]["format"].items():
        mask = formats == value
        alone = classification_report(labels[mask], probs[mask], card.classes, positive_class=card.positive_class,
                                      threshold=card.threshold, n_bootstrap=100, seed=0, groups=patients[mask])
        assert figures["n"] == int(mask.sum()) and figures["patients"] == len(set(patients[mask]))
        assert figures["accuracy"] == pytest.approx(alone["accuracy"])
        assert figures["ci95"] == json.loads(json.dumps(alone["ci95"]))
        assert figures["binary"] == json.loads(json.dumps(alone["binary"]))
    assert written["model"]["threshold"] == card.threshold
    assert (tmp_path / "eval" / "roc.png").is_file() and (tmp_path / "eval" / "confusion.png").is_file()
    assert "heatmaps.png" in summary["files"] and written["heatmaps"]["per_class"] == {c: 2 for c in card.classes}
    with Image.open(tmp_path / "eval" / "heatmaps.png") as image:
        assert image.format == "PNG"

    # the predictions are the artifact's own: decode -> preprocess -> model, as serving does
    config = card.preprocess_config
    images = np.stack([preprocess(decode_image(Path(p).read_bytes(), "x", target_size=config.image_size).pixels, config)
                       for p in predictions["path"]])
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()
    np.testing.assert_allclose(probs, card.calibrate(direct), atol=1e-5)  # calibrated as every surface reports


@pytest.mark.slow
def test_cv_is_interrupted_then_resumed_without_repeating_epochs(ray_cluster, tmp_path, monkeypatch):
    data = tmp_path / "data"
    generate_archive(str(data), n=72, formats=("png",), seed=8, size=64)
    out, storage = tmp_path / "cv_model", tmp_path / "runs"
    argv = ["train", "--data", str(data / "labels.csv"), "--arch", "resnet18", "--epochs", "2", "--image-size", "32",
            "--batch-size", "8", "--folds", "2", "--test-fraction", "0.2", "--cpus-per-worker", "1", "--out", str(out),
            "--storage-path", str(storage), "--max-failures", "0", "--n-bootstrap", "0", "--patience", "0"]

    monkeypatch.setenv("CXR_RAY_FAIL_AFTER_EPOCH", "1")  # the run dies right after epoch 1 of fold 1
    code, summary, err = run_cli(*argv)
    assert code == 1 and summary is None
    assert "re-run the same command to resume" in err.lower()
    assert not (out / "model.json").exists()

    monkeypatch.delenv("CXR_RAY_FAIL_AFTER_EPOCH")
    code, summary, err = run_cli(*argv)  # the same command again
    assert code == 0, err[-3000:]
    cv = json.loads((out / "cv_summary.json").read_text())
    assert cv["n_folds"] == 2 and len(cv["folds"]) == 2
    first, second = cv["folds"]
    assert [r["epoch"] for r in first["history"]] == [1, 2]
    assert [r["attempt"] for r in first["history"]] == [1, 2]  # epoch 1 was not repeated
    assert first["run"]["resumed"] and not second["run"]["resumed"]
    assert [r["attempt"] for r in second["history"]] == [1, 1]
    assert {"mean", "std"} <= set(cv["table"]["accuracy"])
    accuracies = [fold["test"]["accuracy"] for fold in cv["folds"]]
    assert cv["table"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert cv["table"]["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    # held-out folds and the test split partition the patients
    partitions = cv["partitions"]
    assert set(partitions) == {"fold0", "fold1", "test"}
    assert first["sizes"]["test"] == partitions["fold0"]["images"]
    assert sum(p["images"] for p in partitions.values()) == summary["data"]["used"]
    final = cv["final_model"]
    assert final["images"] == partitions["fold0"]["images"] + partitions["fold1"]["images"]
    assert summary["test"]["n"] == partitions["test"]["images"]
    model, card = load_model(str(out))
    assert card.metrics["cv"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    # the small-data recipe (the default for --mode scratch) keeps the fold models: one ensemble artifact
    assert card.training["config"]["recipe"] == "small-data" and card.training["config"]["final"] == "ensemble"
    assert card.ensemble["members"] == 2 and len(card.ensemble["temperatures"]) == 2
    assert card.calibration["per_fold"] == card.ensemble["temperatures"] and card.temperature == 1.0
    assert final["epochs"] == [2, 2] and "fold models" in final["trained_on"]
    assert len(model.members) == 2
    for fold in cv["folds"]:
        assert os.path.isdir(storage / fold["run"]["run_name"])
    # the papers' table: a row per fold, then mean and std
    table = pd.read_csv(out / "cv_table.csv")
    assert len(table) >= 2 and (out / "cv_table.md").read_text().count("\n") >= 4


def test_a_heatmap_grid_that_cannot_be_drawn_is_a_warning_not_a_failure(tmp_path, caplog):
    from cxr_ray.evaluate.report import pick_samples, write_heatmap_grid
    from cxr_ray.models.build import build_model
    from cxr_ray.models.card import new_card

    card = new_card(name="m", arch="resnet18", classes=["covid", "normal"], image_size=32, positive_class="covid")
    model = build_model("resnet18", 2).eval()
    frame = pd.DataFrame({"row_id": [3, 1, 2, 0], "path": ["c3", "c1", "n2", "n0"],
                          "label_name": ["covid", "covid", "normal", "normal"]})
    assert pick_samples(frame, card.classes, per_class=1) == [("c1", "covid"), ("n0", "normal")]
    with caplog.at_level("WARNING"):
        result = write_heatmap_grid(model, card, [(str(tmp_path / "gone.png"), "covid")], str(tmp_path / "grid.png"),
                                    what="validation images")
    assert result == {"error": "ValueError: none of the 1 sample images could be read"}
    assert not (tmp_path / "grid.png").exists() and "heatmap grid not written" in caplog.text


def test_bad_usage_exits_2_before_starting_ray(tmp_path):
    code, _, err = run_cli("train", "--data", str(tmp_path), "--arch", "resnet18", "--mode", "frozen",
                           "--out", str(tmp_path / "m"))
    assert code == 2 and "--pretrained" in err
    code, _, err = run_cli("train", "--data", str(tmp_path), "--arch", "resnet81", "--out", str(tmp_path / "m"))
    assert code == 2 and "resnet18" in err


@pytest.mark.parametrize("label_space", ["keep", "extend"])
def test_init_from_an_artifact_keeps_output_neurons_of_shared_classes(tmp_path, label_space):
    """Twice transfer (Bassi & Attux) and DETL (Basu et al.): the starting weights the driver builds."""
    from cxr_ray.models.artifact import save_artifact
    from cxr_ray.models.build import build_model
    from cxr_ray.models.card import new_card
    from cxr_ray.train.config import TrainConfig
    from cxr_ray.train.prepare import initial_weights, resolve_classes

    torch.manual_seed(1)
    source = build_model("resnet18", 2)
    save_artifact(tmp_path / "source", source,
                  new_card(name="source", arch="resnet18", classes=["normal", "pneumonia"], image_size=32))
    cfg = TrainConfig(data="unused", arch="resnet18", out=str(tmp_path / "out"), mode="finetune",
                      init=str(tmp_path / "source"), label_space=label_space)
    cfg.validate()
    classes, source_classes = resolve_classes(cfg, ["covid", "normal", "pneumonia"])
    assert source_classes == ["normal", "pneumonia"]
    expected = ["normal", "pneumonia", "covid"] if label_space == "extend" else ["covid", "normal", "pneumonia"]
    assert classes == expected
    state, report = initial_weights(cfg, classes, source_classes)
    assert report["kept_classes"] == ["normal", "pneumonia"] and report["new_classes"] == ["covid"]
    for name in ("normal", "pneumonia"):
        row, src = classes.index(name), source_classes.index(name)
        assert torch.equal(state["fc.weight"][row], source.fc.weight[src])
    assert torch.equal(state["layer4.1.conv2.weight"], source.layer4[1].conv2.weight)


def test_extend_needs_an_artifact_and_transfer_modes_need_weights(tmp_path):
    from cxr_ray.errors import UsageError
    from cxr_ray.train.config import TrainConfig

    with pytest.raises(UsageError, match="--init"):
        TrainConfig(data="d", arch="resnet18", out="o", mode="finetune", pretrained="w.pt", label_space="extend").validate()
    with pytest.raises(UsageError, match="scratch"):
        TrainConfig(data="d", arch="resnet18", out="o", mode="scratch", pretrained="imagenet").validate()
    with pytest.raises(UsageError, match="image-size"):
        TrainConfig(data="d", arch="mobilenet_v2", out="o", image_size=16).validate()


@pytest.mark.slow
def test_the_card_keeps_a_drift_fingerprint_of_the_validation_split(trained):
    """model.json's ``drift_fingerprint``: the validation split's score histogram (its images, in
    the 10 fixed bins) and header mix, counts only, for the screening report's drift check."""
    summary, out, _, _ = trained
    card = json.loads((out / "model.json").read_text())
    fingerprint = card["drift_fingerprint"]
    val_images = card["training"]["splits"]["val"]["images"]
    assert fingerprint["computed_on"] == "validation" and fingerprint["images"] == val_images
    assert fingerprint["score"]["class"] == "covid" and len(fingerprint["score"]["bin_edges"]) == 11
    assert sum(fingerprint["score"]["counts"]) == val_images
    headers = fingerprint["headers"]
    assert headers["format"] == {"png": val_images}  # the phantoms are PNGs of 64 px: no DICOM header
    assert headers["modality"] == {"(none)": val_images} and headers["size_band"] == {"<1024": val_images}
    assert sum(headers["photometric_interpretation"].values()) == val_images


@pytest.mark.xfail(strict=True, reason=(
    "issue 15's acceptance bar, not met yet: with the small-data recipe (batch 32 = 48 steps in 12 epochs) "
    "mobilenet_v2 reached 0.29 held-out (resnet18: 0.90); the best variants measured (batch 8, AdamW lr 1e-2-2e-2, "
    "lighter or no augmentation) reached 0.61-0.78. Precise BN is already on (eval-mode training accuracy was "
    "1.00 without augmentation), so stale BatchNorm statistics are not the cause: it is generalisation."))
def test_the_default_recipe_learns_the_phantoms_with_mobilenet_from_scratch(ray_cluster, tmp_path):
    """The issue's bar: mobilenet_v2 from scratch at 96 px, 240 phantoms, 12 epochs, held-out accuracy >= 0.9,
    with nothing but the architecture, size and epochs given (the recipe decides the rest)."""
    data = tmp_path / "data"
    generate_archive(str(data), n=240, formats=("png",), seed=5, size=128)
    code, summary, err = run_cli(
        "train", "--data", str(data / "labels.csv"), "--arch", "mobilenet_v2", "--mode", "scratch", "--epochs", "12",
        "--image-size", "96", "--out", str(tmp_path / "model"), "--storage-path", str(tmp_path / "runs"),
        "--n-bootstrap", "0", "--quiet",
    )
    assert code == 0, err[-3000:]
    assert summary["test"]["n"] >= 40  # held-out PATIENTS' images
    assert summary["test"]["accuracy"] >= 0.9, summary["test"]
