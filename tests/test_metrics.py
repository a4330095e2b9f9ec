"""Metrics against scikit-learn and hand counts; thresholds, fold summaries, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cxr_ray.evaluate import choose_threshold, classification_report, summarize_folds
from cxr_ray.evaluate.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from cxr_ray.evaluate.metrics import _weighted_auc
from cxr_ray.testing import CLASSES


def _predictions(n: int = 300, k: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, informative-but-imperfect class probabilities (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_report_matches_sklearn():
    y, probs = _predictions()
    pred = probs.argmax(axis=1)
    report = classification_report(y, probs, CLASSES, n_bootstrap=0)

    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert report["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=[0, 1, 2])
    for i, name in enumerate(CLASSES):
        row = report["per_class"][name]
        assert row["sensitivity"] == pytest.approx(recall[i])
        assert row["ppv"] == pytest.approx(precision[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
        assert row["auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    assert np.array(report["confusion_matrix"]["matrix"]).sum() == len(y)
    assert "ci95" not in report
    json.dumps(report)  # plain JSON types only


def test_specificity_and_npv_by_hand():
    # true:      a a a b b c ; predicted: a a b b a c   (probabilities put the mass on the prediction)
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    report = classification_report(y, probs, ["a", "b", "c"], n_bootstrap=0)
    assert report["confusion_matrix"]["matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    a, b, c = (report["per_class"][k] for k in "abc")
    # class a: TP 2, FN 1, FP 1, TN 2
    assert a["specificity"] == pytest.approx(2 / 3) and a["npv"] == pytest.approx(2 / 3)
    assert a["sensitivity"] == pytest.approx(2 / 3) and a["ppv"] == pytest.approx(2 / 3)
    # class b: TP 1, FN 1, FP 1, TN 3
    assert b["specificity"] == pytest.approx(3 / 4) and b["npv"] == pytest.approx(3 / 4)
    # class c: TP 1, FN 0, FP 0, TN 5
    assert c["specificity"] == 1.0 and c["npv"] == 1.0 and c["sensitivity"] == 1.0


def test_binary_positive_vs_rest():
    y, probs = _predictions(seed=3)
    report = classification_report(y, probs, CLASSES, positive_class="covid", threshold=0.4, n_bootstrap=0)
    binary = report["binary"]
    positive, flagged = y == 0, probs[:, 0] >= 0.4
    assert binary["threshold"] == 0.4 and binary["positive_class"] == "covid"
    assert binary["sensitivity"] == pytest.approx((flagged & positive).sum() / positive.sum())
    assert binary["specificity"] == pytest.approx((~flagged & ~positive).sum() / (~positive).sum())
    assert binary["ppv"] == pytest.approx((flagged & positive).sum() / flagged.sum())
    assert binary["npv"] == pytest.approx((~flagged & ~positive).sum() / (~flagged).sum())
    assert binary["accuracy"] == pytest.approx(np.mean(flagged == positive))
    assert binary["auc"] == pytest.approx(roc_auc_score(positive, probs[:, 0]))
    _, _, f1, _ = precision_recall_fscore_support(positive, flagged, average="binary")
    assert binary["f1"] == pytest.approx(f1)
    default = classification_report(y, probs, CLASSES, positive_class="covid", n_bootstrap=0)
    assert default["binary"]["threshold"] == 0.5


def test_absent_class_does_not_crash():
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6],
                      [0.8, 0.1, 0.1], [0.3, 0.6, 0.1]])
    report = classification_report(y, probs, CLASSES, positive_class="pneumonia", n_bootstrap=200)
    assert report["per_class"]["pneumonia"]["auc"] is None
    assert report["per_class"]["pneumonia"]["sensitivity"] is None
    assert report["binary"]["auc"] is None and report["binary"]["sensitivity"] is None
    assert report["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == i, probs[:, i]) for i in (0, 1)]))
    assert report["binary"]["ci95"]["auc"] is None
    json.dumps(report)


def test_bootstrap_ci_contains_estimate():
    # No wall-clock assertion (the suite never asserts times): the resamples are vectorised
    # weighted sums, so 1000 x 1000 is a fraction of a second on an idle core.
    y, probs = _predictions(n=1000, seed=5)
    report = classification_report(y, probs, CLASSES, positive_class="covid", n_bootstrap=1000, seed=0)
    for name in ("accuracy", "balanced_accuracy", "macro_auc"):
        low, high = report["ci95"][name]
        assert low <= report[name] <= high and high - low < 0.15
    for name in ("sensitivity", "specificity", "auc"):
        low, high = report["binary"]["ci95"][name]
        assert low <= report["binary"][name] <= high
    again = classification_report(y, probs, CLASSES, positive_class="covid", n_bootstrap=1000, seed=0)
    assert again["ci95"] == report["ci95"]  # seeded


def test_weighted_auc_equals_sklearn_on_resample():
    rng = np.random.default_rng(7)
    positive = rng.random(200) < 0.3
    scores = np.round(rng.random(200), 1)  # many ties
    idx = rng.integers(0, 200, size=200)
    weights = np.bincount(idx, minlength=200).astype(float)[None, :]
    expected = roc_auc_score(positive[idx], scores[idx])
    assert _weighted_auc(positive, scores, weights)[0] == pytest.approx(expected)


def test_choose_threshold_meets_target_on_its_data():
    y, probs = _predictions(n=400, seed=11)
    positive, scores = y == 0, probs[:, 0]
    for target in (0.8, 0.9, 0.95, 1.0):
        chosen = choose_threshold(positive, scores, target_sensitivity=target)
        flagged = scores >= chosen["positive"]
        sensitivity = (flagged & positive).sum() / positive.sum()
        assert sensitivity >= target
        assert chosen["val_sensitivity"] == pytest.approx(sensitivity)
        assert chosen["val_specificity"] == pytest.approx((~flagged & ~positive).sum() / (~positive).sum())
        assert chosen["chosen_on"] == "validation" and chosen["target_sensitivity"] == target
        # the highest such threshold: the next higher score falls short of the target
        higher = np.sort(np.unique(scores[scores > chosen["positive"]]))
        if higher.size:
            assert ((scores >= higher[0]) & positive).sum() / positive.sum() < target
    with pytest.raises(ValueError, match="both positive and negative"):
        choose_threshold(np.ones(5), np.linspace(0, 1, 5))


def test_summarize_folds_mean_std():
    reports = []
    for seed in (1, 2, 3):
        y, probs = _predictions(n=120, seed=seed)
        reports.append(classification_report(y, probs, CLASSES, positive_class="covid", n_bootstrap=50))
    summary = summarize_folds(reports)
    assert summary["n_folds"] == 3
    for name, pick in (
        ("accuracy", lambda r: r["accuracy"]),
        ("per_class.normal.specificity", lambda r: r["per_class"]["normal"]["specificity"]),
        ("binary.sensitivity", lambda r: r["binary"]["sensitivity"]),
        ("macro_auc", lambda r: r["macro_auc"]),
    ):
        values = [pick(r) for r in reports]
        assert summary["metrics"][name]["mean"] == pytest.approx(np.mean(values))
        assert summary["metrics"][name]["std"] == pytest.approx(np.std(values, ddof=1))
        assert summary["metrics"][name]["per_fold"] == values
    names = [row["metric"] for row in summary["table"]]
    assert "accuracy" in names and not any(n.startswith(("ci95", "confusion_matrix")) for n in names)
    assert summarize_folds(reports[:1])["metrics"]["accuracy"]["std"] == 0.0
    json.dumps(summary)


def test_plots_write_pngs(tmp_path):
    from cxr_ray.evaluate.plots import plot_confusion, plot_roc, plot_training_curves

    y, probs = _predictions(n=60)
    report = classification_report(y, probs, CLASSES, n_bootstrap=0)
    history = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_accuracy": 0.5 + e / 10,
         "val_auc": 0.6 + e / 20, "lr": 1e-3 * 0.5**e}
        for e in range(4)
    ]
    paths = [
        plot_roc(y, probs, CLASSES, tmp_path / "roc.png"),
        plot_confusion(report["confusion_matrix"]["matrix"], CLASSES, tmp_path / "cm.png"),
        plot_training_curves(history, tmp_path / "sub" / "curves.png"),
    ]
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no pyplot state leaked


def test_patient_bootstrap_differs_from_image_bootstrap_only_with_several_images_per_patient():
    # 100 patients x 4 images each; one patient's images share their correctness (a hard patient
    # stays hard), which is what makes images of one patient dependent and image CIs too narrow.
    rng = np.random.default_rng(11)
    patients = np.repeat(np.arange(100), 4)
    y = np.repeat(rng.integers(0, 3, size=100), 4)
    hard = np.repeat(rng.random(100) < 0.3, 4)
    logits = rng.normal(scale=0.3, size=(len(y), 3)) + np.where(hard[:, None], -2.0, 2.0) * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    def ci(groups):
        report = classification_report(y, probs, CLASSES, positive_class="covid", n_bootstrap=500, seed=0,
                                       groups=groups)
        return report["ci95"]

    by_image, by_patient = ci(None), ci([f"P{p}" for p in patients])
    assert by_patient != by_image
    width = {name: (np.diff(by_image[name])[0], np.diff(by_patient[name])[0]) for name in ("accuracy", "macro_auc")}
    assert all(patient > 1.3 * image for image, patient in width.values()), width  # clusters: wider intervals

    # one image per patient: the patient bootstrap IS the image bootstrap, draw for draw
    single = np.arange(len(y))
    assert ci([f"P{i}" for i in single]) == by_image


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    # logits 4x too large: right ~70% of the time but ~99% sure
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=2000)
    logits = 4.0 * (rng.normal(size=(2000, 3)) + 1.2 * np.eye(3)[y])
    val, test = slice(0, 1000), slice(1000, None)
    temperature = fit_temperature(logits[val], y[val])  # fitted on validation cases only
    assert 2.5 < temperature < 6.0
    before = expected_calibration_error(apply_temperature(logits[test], 1.0), y[test])
    after = expected_calibration_error(apply_temperature(logits[test], temperature), y[test])
    assert before > 0.15 and after < 0.05 and after < before / 3
    # the arg-max, so accuracy, is unchanged
    assert (apply_temperature(logits, temperature).argmax(1) == logits.argmax(1)).all()
