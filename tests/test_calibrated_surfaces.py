"""Calibrated probabilities and fold ensembles on every surface: torch, ONNX Runtime, ``cxr-ray screen``
(real Ray Data) and ``cxr-ray serve`` (real Ray Serve over HTTP on 127.0.0.1) give what the artifact's
own network and card give. Two artifacts: one model with a fitted temperature in ``model.json``, and a
two-member fold ensemble (each member's temperature inside the graph), both exported to ONNX as
``cxr-ray export`` writes them."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _screen_testing import read_rows, screen_config
from _serve_testing import deploy

from cxr_ray.engines.load import load_backend
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import load_model
from cxr_ray.models.ensemble import FoldEnsemble
from cxr_ray.preprocess import preprocess
from cxr_ray.synth import generate_archive
from cxr_ray.testing import CLASSES, IMAGE_SIZE, make_artifact, seeded_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROBS = [f"prob_{c}" for c in CLASSES]
TEMPERATURE = 0.4  # < 1 sharpens: far from the identity, so a surface that skips it is caught
MEMBER_TEMPERATURES = [0.5, 2.0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated-archive")
    labels = generate_archive(str(root), n=8, formats=("png",), seed=21, size=IMAGE_SIZE)
    return root, [str(root / p) for p in labels["path"]]


@pytest.fixture(scope="module", params=["temperature", "ensemble"])
def artifact(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"calibrated-{request.param}") / "model"
    if request.param == "temperature":
        return make_artifact(directory, name="calibrated", positive_class="covid", calibrate_bn=True, onnx=True,
                             card_fields={"calibration": {"method": "temperature", "temperature": TEMPERATURE,
                                                          "fitted_on": "validation"}})
    members = [seeded_model("mobilenet_v2", CLASSES, seed=seed, calibrate_bn_at=IMAGE_SIZE) for seed in (1, 2)]
    ensemble = {"members": 2, "temperatures": MEMBER_TEMPERATURES, "combine": "mean of calibrated probabilities"}
    return make_artifact(directory, name="ensemble", positive_class="covid", onnx=True,
                         model=FoldEnsemble(members, MEMBER_TEMPERATURES).eval(),
                         card_fields={"ensemble": ensemble,
                                      "calibration": {"method": "temperature", "temperature": 1.0}})


def _inputs(paths, card) -> np.ndarray:
    config = card.preprocess_config
    return np.stack([preprocess(decode_image(Path(p).read_bytes(), p, target_size=config.image_size).pixels, config)
                     for p in paths])


def _check_the_ensemble_by_hand(model, inputs: torch.Tensor, probs: np.ndarray) -> None:
    """The ensemble's output is the mean of its members' softmax(logits / T_i), and the T_i matter."""
    members = [m(inputs) for m in model.members]
    calibrated = np.mean([torch.softmax(z / t, dim=1).numpy() for z, t in zip(members, MEMBER_TEMPERATURES,
                                                                                strict=True)], axis=0)
    np.testing.assert_allclose(probs, calibrated, atol=1e-6)
    assert np.abs(probs - np.mean([torch.softmax(z, dim=1).numpy() for z in members], axis=0)).max() > 1e-3


@pytest.fixture(scope="module")
def reference(artifact, archive):
    """The calibrated probabilities by hand: the artifact's network in eager PyTorch, then the card."""
    _, paths = archive
    model, card = load_model(str(artifact))
    with torch.no_grad():
        raw = torch.softmax(model(torch.from_numpy(_inputs(paths, card))), dim=1).numpy()
        if card.ensemble:
            _check_the_ensemble_by_hand(model, torch.from_numpy(_inputs(paths, card)), raw)
    calibrated = card.calibrate(raw)
    if not card.ensemble:
        assert np.abs(calibrated - raw).max() > 1e-3  # the temperature is not a no-op on these images
    assert np.ptp(calibrated, axis=0).max() > 1e-3  # images get different answers
    return dict(zip(paths, calibrated, strict=True))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_backends_give_the_calibrated_probabilities(artifact, archive, reference, backend):
    _, paths = archive
    _, card = load_model(str(artifact))
    engine = load_backend(str(artifact), backend, device="cpu", num_threads=1)
    got = card.decide(engine.predict(_inputs(paths, card))).probabilities
    np.testing.assert_allclose(got, np.stack([reference[p] for p in paths]), atol=1e-5)


def test_screen_writes_the_calibrated_probabilities(ray_cluster, artifact, archive, reference, tmp_path):
    from cxr_ray.screen.job import run_screen

    root, paths = archive
    run_screen(screen_config(str(artifact), [str(root / "labels.csv")], tmp_path / "out"))
    rows = read_rows(tmp_path / "out")
    assert sorted(rows["path"]) == sorted(paths) and (rows["status"] == "ok").all()
    np.testing.assert_allclose(rows[PROBS].to_numpy(), np.stack([reference[p] for p in rows["path"]]), atol=1e-5)
    np.testing.assert_allclose(rows["score"].to_numpy(), rows["prob_covid"].to_numpy())


def test_serve_answers_the_calibrated_probabilities(ray_cluster, artifact, archive, reference):
    from ray import serve

    from cxr_ray.serve.config import ServeArgs

    _, paths = archive
    name = f"calibrated-{artifact.parent.name}"
    url = deploy(ServeArgs(model=str(artifact)), name=name, route_prefix=f"/{name}")
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for path in paths:
                response = client.post("/v1/predict", content=Path(path).read_bytes(),
                                       headers={"Content-Type": "image/png"})
                assert response.status_code == 200, response.text
                body = response.json()
                # atol as on the other surfaces: serve's auto engine may be OpenVINO fp32 (~5e-6 off ORT)
                np.testing.assert_allclose([body["probabilities"][c] for c in CLASSES], reference[path],
                                           atol=1e-5)
    finally:
        serve.delete(name)
