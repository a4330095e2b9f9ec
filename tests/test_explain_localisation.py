"""The objective check: on a model trained on the phantom archive, the heatmap for the
positive class (covid) lands on the phantom's own lesion masks.

One DenseNet-121 is trained per test session (module fixture) (plain PyTorch, from scratch, 96 px, 300
phantom images, 4 epochs, one torch thread), then scored on a held-out phantom
archive with :func:`cxr_ray.explain.localisation_report`:

* energy ratio: heatmap mass inside the mask / the mask's area share (chance = 1.0);
* pointing game: the heatmap's maximum inside the mask, strict and with a tolerance
  of ``DEFAULT_TOLERANCE`` x the image's shorter side (chance = the mask's area share).

Thresholds sit well below what was measured (see the comments) and well above chance.
The report is written to the session's tmp dir and printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os

import pytest

from cxr_ray.cli import main as cli_main
from cxr_ray.explain.localisation import DEFAULT_TOLERANCE, localisation_report

# Training dominates (~1.5 min on two idle cores, far more on a loaded shared box).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ARCH = "densenet121"
IMAGE_SIZE = 96  # the phantom is drawn at 128 px high; heatmaps are scored at that size
EPOCHS = 4
PER_CLASS = 24  # held-out images per lesion class that are scored
FINE_GRADCAM = "gradcam@features.denseblock3"  # stride 16: 6 x 6 cells at 96 px
PIXEL_LRP = "lrp@features.conv0"  # DenseNet LRP read at the first convolution




@pytest.fixture(scope="module")
def phantom(tmp_path_factory, one_torch_thread_per_module):  # one thread: reproducible weights
    synth = pytest.importorskip("cxr_ray.synth", reason="needs the phantom generator cxr_ray.synth")
    from cxr_ray.explain.phantom_check import PHANTOM_CLASSES, accuracy, train_phantom_model

    root = tmp_path_factory.mktemp("phantom")
    for name, n, seed in (("train", 300, 1), ("eval", 90, 2)):
        synth.generate_archive(str(root / name), n=n, formats="png", classes=PHANTOM_CLASSES, seed=seed, size=128)
    model, card, history = train_phantom_model(
        str(root / "train" / "labels.csv"), ARCH, image_size=IMAGE_SIZE, epochs=EPOCHS, seed=0
    )
    eval_labels = str(root / "eval" / "labels.csv")
    return {
        "model": model,
        "card": card,
        "history": history,
        "eval_labels": eval_labels,
        "eval_accuracy": accuracy(model, card, eval_labels),
        "root": root,
    }


@pytest.fixture(scope="module")
def report(phantom):
    result = localisation_report(
        phantom["model"],
        phantom["card"],
        phantom["eval_labels"],
        methods=["gradcam", FINE_GRADCAM, "lrp", PIXEL_LRP],
        classes=["covid", "pneumonia"],
        limit=PER_CLASS,
    )
    result["eval_accuracy"] = phantom["eval_accuracy"]
    result["history"] = phantom["history"]
    (phantom["root"] / "localisation.json").write_text(json.dumps(result, indent=2))
    print("\nlocalisation report:", json.dumps(result, indent=2))
    return result


# Measured, covid | pneumonia. A: this fixture's model (24 images per class; reproducible to the
# digit run after run). B, C: two DenseNet-121s trained during development on an earlier draw of
# the phantom (B: cosine, 3 epochs; C: constant rate, 6 epochs; 32 images per class).
#                          A              B              C
#   gradcam@denseblock3    energy 2.04 | 4.53   2.24 | 4.19   2.72 | 4.31
#                          pointing 0.88 | 0.83 0.69 | 0.31   0.91 | 0.94   (strict)
#   lrp (transition2)      energy 2.28 | 9.32   1.89 | 12.8   4.24 | 11.3
#                          pointing 0.67 | 0.96 0.44 | 0.53   1.00 | 0.97   (4 % tolerance)
#   lrp@conv0 (pixels)     energy 0.74 | 7.00   0.60 | 3.01   1.95 | 9.83
#   gradcam (norm5)        energy 1.26 | 2.20   1.25 | 1.52   1.43 | 2.06
# Chance: energy 1.0; pointing = the mask's area share, ~0.065 covid, ~0.02 pneumonia.
# The thresholds below hold for all three, with margin.


def test_phantom_model_is_accurate(phantom):
    assert phantom["eval_accuracy"] >= 0.85, phantom["history"]


def test_gradcam_concentrates_on_the_covid_lesions(report):
    fine = report["results"][FINE_GRADCAM]["covid"]
    assert fine["n"] == PER_CLASS
    assert fine["energy_ratio_mean"] >= 1.6
    assert fine["pointing_game"] >= 0.6  # strict: the maximum inside the mask itself
    # The registry's layer (norm5, stride 32) is a 3 x 3 map at 96 px: above chance in
    # energy, too coarse for the pointing game; reported, not held to it.
    assert report["results"]["gradcam"]["covid"]["energy_ratio_mean"] >= 1.1


def test_lrp_concentrates_on_the_covid_lesions(report):
    covid = report["results"]["lrp"]["covid"]
    assert report["layers"]["lrp"] == "features.transition2.pool"
    assert covid["energy_ratio_mean"] >= 1.5
    assert covid["pointing_game_tolerant"] >= 0.4
    assert covid["pointing_game_tolerant"] >= 4 * covid["chance_pointing"]


def test_pneumonia_heatmaps_find_the_consolidation(report):
    assert report["results"]["lrp"]["pneumonia"]["energy_ratio_mean"] >= 5.0
    # Pixel-level DenseNet LRP: reliable on the dense consolidation, not on faint covid haze
    # (see cxr_ray.explain.methods), so only the pneumonia figure is held to a bound.
    assert report["results"][PIXEL_LRP]["pneumonia"]["energy_ratio_mean"] >= 1.5
    assert report["results"][FINE_GRADCAM]["pneumonia"]["energy_ratio_mean"] >= 2.5


def test_cli_evaluate_localisation_prints_json(phantom, tmp_path, capsys):
    from cxr_ray.models.artifact import save_artifact

    save_artifact(tmp_path / "model", phantom["model"], phantom["card"])
    code = cli_main(
        ["explain", "--model", str(tmp_path / "model"), "--evaluate-localisation", phantom["eval_labels"],
         "--method", "lrp", "--limit", "4"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    covid = printed["results"]["lrp"]["covid"]
    assert covid["n"] == 4 and covid["pointing_tolerance"] == DEFAULT_TOLERANCE
    assert printed["arch"] == ARCH and printed["layers"]["lrp"] == "features.transition2.pool"
    assert os.path.isabs(printed["labels"]) or printed["labels"] == phantom["eval_labels"]
