"""Model artifact: safetensors + model.json round-trip, version hash, integrity errors."""

from __future__ import annotations

import json

import pytest
import torch

from cxr_ray.errors import ArtifactError
from cxr_ray.models.artifact import CARD_FILE, WEIGHTS_FILE, load_card, load_model, save_artifact
from cxr_ray.models.card import new_card
from cxr_ray.testing import CLASSES, make_artifact, seeded_model


@pytest.fixture()
def artifact(tmp_path):
    model = seeded_model()
    make_artifact(tmp_path / "model", model=model, name="unit", positive_class="covid",
                  thresholds={"positive": 0.3, "chosen_on": "validation"})
    return tmp_path / "model", model


def test_round_trip_gives_identical_outputs(artifact):
    path, model = artifact
    loaded, card = load_model(str(path))
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert card.classes == CLASSES and card.positive_index == 0 and card.threshold == 0.3
    assert card.preprocess_config.image_size == 64
    assert len(card.version) == 16 and card.created_at


def test_card_preprocessing_is_derived_from_the_arch():
    card = new_card(name="x", arch="xception", classes=CLASSES)
    assert card.image_size == 299
    assert card.preprocessing["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="image_size >= 71"):
        new_card(name="x", arch="xception", classes=CLASSES, image_size=32)
    with pytest.raises(ValueError, match="positive class"):
        new_card(name="x", arch="xception", classes=CLASSES, positive_class="tb")


def test_version_changes_with_weights_and_threshold(artifact, tmp_path):
    path, model = artifact
    base = load_card(str(path)).version
    card = new_card(name="unit", arch="mobilenet_v2", classes=CLASSES, image_size=64, positive_class="covid",
                    thresholds={"positive": 0.9, "chosen_on": "validation"})
    assert save_artifact(tmp_path / "other", model, card).version != base
    with torch.no_grad():
        model.classifier[1].bias.add_(1.0)
    card2 = new_card(name="unit", arch="mobilenet_v2", classes=CLASSES, image_size=64, positive_class="covid",
                     thresholds={"positive": 0.3, "chosen_on": "validation"})
    assert save_artifact(tmp_path / "third", model, card2).version != base


def test_weights_are_safetensors_not_pickle(artifact):
    path, _ = artifact
    header_len = int.from_bytes((path / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((path / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["arch"] == "mobilenet_v2"


def test_integrity_errors_are_typed(artifact, tmp_path):
    path, _ = artifact
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_card(str(tmp_path / "nowhere"))
    card = json.loads((path / CARD_FILE).read_text())
    card["classes"] = ["a", "b"]
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="do not match"):
        load_model(str(path))
    card["schema_version"] = 99
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="schema_version"):
        load_card(str(path))
