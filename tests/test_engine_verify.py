"""The real-image sample an engine is verified on at load is what screening feeds a network."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_ray.engines.verify import labelled_sample
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import PreprocessConfig, preprocess
from cxr_ray.synth.archive import generate_archive


@pytest.mark.parametrize("normalization", ["fixed", "per_image"])
def test_the_labelled_sample_is_standardised_like_every_surface(artifact_factory, tmp_path, normalization):
    root = tmp_path / "set"
    generate_archive(str(root), n=8, formats=("png", "dcm"), size=96, seed=5)
    card = load_card(str(artifact_factory("verify", image_size=48, positive_class="covid",
                                          card_fields={"normalization": normalization})))
    sample = labelled_sample(str(root / "labels.csv"), card, limit=8)
    assert sample.labels is not None and len(sample.images) + sample.skipped == 8 and len(sample.images) >= 4
    config = PreprocessConfig.from_dict(dict(card.preprocessing))
    assert config.normalization == normalization
    # the same images, one by one, through the function screen / serve / listen use
    frame = pd.read_csv(root / "labels.csv")
    expected = []
    for path in frame["path"]:
        try:
            expected.append(preprocess(decode_image((root / path).read_bytes(), path, target_size=48).pixels, config))
        except Exception:  # noqa: BLE001 - the corrupt ones the sample skipped
            continue
    expected_images = np.stack(expected)
    assert expected_images.shape == sample.images.shape
    np.testing.assert_allclose(sample.images, expected_images, atol=1e-4)
    # standardised, not unit images: per_image ones have mean 0 and std 1 each
    if normalization == "per_image":
        np.testing.assert_allclose(sample.images.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
        np.testing.assert_allclose(sample.images.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
