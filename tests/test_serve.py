"""The HTTP endpoint, for real: Ray Serve's proxy on 127.0.0.1, httpx as the client,
the real decoder and backend behind it. One app for the whole module."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from _serve_testing import CLASSES, deploy, make_artifact, reference_probabilities

from cxr_ray.serve.config import DeploymentArgs, ServeArgs

APP = "test-serve"
SAMPLES = {
    "png": ("00000001_000.png", "image/png"),
    "jpeg": ("16747_3_1.jpg", "image/jpeg"),
    "dicom": ("rsna-pneumonia-sample.dcm", "application/dicom"),
}
MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def server(ray_cluster, artifact):
    from ray import serve

    args = ServeArgs(
        model=str(artifact),
        max_body_mb=MAX_BODY_MB,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,  # long enough that 8 concurrent requests share a batch
        ingress=DeploymentArgs(num_replicas=1, max_ongoing_requests=64, max_queued_requests=64,
                               ray_actor_options={"num_cpus": 0}),
        predictor=DeploymentArgs(num_replicas=1, max_ongoing_requests=16, max_queued_requests=32,
                                 ray_actor_options={"num_cpus": 0}),
    )
    url = deploy(args, name=APP, route_prefix="/")
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def samples(real_data_dir):
    return {fmt: (real_data_dir / name).read_bytes() for fmt, (name, _) in SAMPLES.items()}


def _assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body


# ------------------------------------------------------------------ metadata routes


def test_healthz_model_card_and_docs(client, artifact):
    from cxr_ray.models.artifact import load_card

    card = load_card(str(artifact))
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"]["version"] == card.version
    info = client.get("/v1/model").json()
    assert info["classes"] == CLASSES and info["version"] == card.version and info["image_size"] == 64
    assert info["positive_class"] == "covid" and info["threshold"] == card.threshold
    assert info["batching"] == {"enabled": True, "max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    assert "gradcam" in info["explain_methods"]
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/dicom", "image/png", "image/jpeg", "multipart/form-data"} <= set(body)


# ------------------------------------------------------------------ predictions


def test_the_test_model_depends_on_its_input(artifact, samples):
    """Guard for the equality tests below: different images, different probabilities."""
    probs = [reference_probabilities(artifact, data) for data in samples.values()]
    assert max(abs(a - b) for a, b in zip(probs[0], probs[1], strict=True)) > 1e-3, probs


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_predict_matches_the_backend_called_directly(client, artifact, samples, fmt):
    data, content_type = samples[fmt], SAMPLES[fmt][1]
    response = client.post("/v1/predict", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference_probabilities(artifact, data)
    got = [body["probabilities"][c] for c in CLASSES]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert body["label"] == CLASSES[int(np.argmax(expected))]
    assert body["score"] == pytest.approx(expected[0], abs=1e-6)
    assert body["flagged"] == (body["score"] >= body["threshold"])
    assert body["format"] == fmt and body["model"]["name"] == "t" and body["request_id"]
    assert response.headers.get("x-request-id") == body["request_id"]
    if fmt == "dicom":
        assert (body["modality"], body["view"]) == ("CR", "PA")
    assert body["timing"]["decode_ms"] > 0 and body["batch_size"] >= 1


def test_generic_content_type_is_sniffed_and_multipart_works(client, artifact, samples):
    expected = reference_probabilities(artifact, samples["dicom"])
    sniffed = client.post("/v1/predict", content=samples["dicom"], headers={"Content-Type": "application/octet-stream"})
    assert sniffed.status_code == 200, sniffed.text
    assert sniffed.json()["format"] == "dicom"
    multipart = client.post("/v1/predict", files={"file": ("x.dcm", samples["dicom"], "application/dicom")})
    assert multipart.status_code == 200, multipart.text
    for response in (sniffed, multipart):
        got = [response.json()["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # A declared type that disagrees with the content: decoded by content, with a warning.
    mismatch = client.post("/v1/predict", content=samples["png"], headers={"Content-Type": "image/jpeg"})
    assert mismatch.status_code == 200 and mismatch.json()["format"] == "png"
    assert any(w.startswith("content_type_mismatch") for w in mismatch.json()["warnings"])


def test_explain_gradcam_adds_a_png_heatmap(client, samples):
    from PIL import Image

    response = client.post("/v1/predict?explain=gradcam", content=samples["png"], headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["explain_method"] == "gradcam"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and min(overlay.size) >= 64
    # mobilenet_v2 has no LRP: a clear 400, not a 500.
    _assert_error(
        client.post("/v1/predict?explain=lrp", content=samples["png"], headers={"Content-Type": "image/png"}),
        400, "bad_request",
    )


# ------------------------------------------------------------------ errors


def test_malformed_requests_are_400(client, samples):
    _assert_error(client.post("/v1/predict", files={"image": ("x.png", samples["png"], "image/png")}), 400, "bad_request")
    _assert_error(
        client.post("/v1/predict", content=b"--x\r\nnot multipart", headers={"Content-Type": "multipart/form-data"}),
        400, "bad_request",
    )
    _assert_error(
        client.post("/v1/predict?explain=shap", content=samples["png"], headers={"Content-Type": "image/png"}),
        400, "bad_request",
    )
    _assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    _assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_bodies_over_the_limit_are_413_declared_or_streamed(client):
    big = b"\0" * int(MAX_BODY_MB * 1024 * 1024 + 1)
    _assert_error(client.post("/v1/predict", content=big, headers={"Content-Type": "image/png"}), 413, "too_large")

    def chunks():  # no Content-Length: counted while reading
        for _ in range(4):
            yield b"\0" * (512 * 1024)

    response = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/dicom"})
    assert "content-length" not in response.request.headers
    _assert_error(response, 413, "too_large")


def test_unsupported_content_type_is_415(client, samples):
    _assert_error(client.post("/v1/predict", content=samples["png"], headers={"Content-Type": "text/plain"}), 415,
                  "unsupported_media_type")
    _assert_error(client.post("/v1/predict", files={"file": ("x.txt", b"hello", "text/plain")}), 415,
                  "unsupported_media_type")


def test_undecodable_or_lateral_images_are_422_with_the_decode_code(client, samples, tmp_path):
    import pydicom

    rng = np.random.default_rng(0)
    _assert_error(
        client.post("/v1/predict", content=rng.bytes(4096), headers={"Content-Type": "application/octet-stream"}),
        422, "not_an_image",
    )
    _assert_error(client.post("/v1/predict", content=b"", headers={"Content-Type": "image/png"}), 422, "empty")
    ds = pydicom.dcmread(io.BytesIO(samples["dicom"]))
    ds.ViewPosition = "LL"
    lateral = io.BytesIO()
    ds.save_as(lateral)
    body = _assert_error(
        client.post("/v1/predict", content=lateral.getvalue(), headers={"Content-Type": "application/dicom"}),
        422, "lateral_view",
    )
    assert str(ds.PatientID) not in body["error"]["message"]


# ------------------------------------------------------------------ batching and load


async def _post_concurrently(url: str, data: bytes, n: int, concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> httpx.Response:
            async with semaphore:
                return await client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})

        return await asyncio.gather(*(one() for _ in range(n)))


def test_concurrent_requests_share_model_batches(server, samples):
    seen: list[int] = []
    for _ in range(3):  # batching is timing-based; three rounds of 8 make a miss vanishingly rare
        responses = asyncio.run(_post_concurrently(server, samples["png"], 8, 8))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        seen += [r.json()["batch_size"] for r in responses]
        if max(seen) > 1:
            break
    assert max(seen) > 1, seen
    assert max(seen) <= 8


def test_bounded_load_500_requests_16_concurrent_has_no_errors(server, samples):
    responses = asyncio.run(_post_concurrently(server, samples["png"], 500, 16))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}
    assert len({r.json()["request_id"] for r in responses}) == 500


# ------------------------------------------------------------------ property-based


def test_openapi_property_based_no_server_errors(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]  # an Err fails the test
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call_and_validate(checks=checks)
                seen.setdefault(case.operation.label, set()).add(response.status_code)

            try:
                run()
            except Unsatisfiable:  # no parameters / body to make invalid (e.g. GET /healthz)
                assert mode is GenerationMode.NEGATIVE and operation.label != "POST /v1/predict"
    assert {"POST /v1/predict", "GET /v1/model", "GET /healthz"} <= set(seen)
    # Generated bodies are not X-rays: the endpoint must have said so with 4xx, never 5xx.
    assert seen["POST /v1/predict"] & {400, 413, 415, 422}, seen


# ------------------------------------------------------------------ logs


def test_logs_carry_request_ids_but_no_patient_identifiers(client, samples):
    """After DICOM requests (ok and refused), Serve's logs have our access lines and no identifiers."""
    import time
    from pathlib import Path

    import pydicom
    import ray

    ds = pydicom.dcmread(io.BytesIO(samples["dicom"]))
    ok = client.post("/v1/predict", content=samples["dicom"], headers={"Content-Type": "application/dicom"})
    assert ok.status_code == 200
    identifiers = {str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)}
    identifiers = {i for i in identifiers if len(i) >= 6}
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 30
    while True:  # log files are written asynchronously
        text = "\n".join(p.read_text(errors="replace") for p in logs_dir.glob("*.log"))
        if ok.json()["request_id"] in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert f"request_id={ok.json()['request_id']}" in text
    assert "error_code=lateral_view" in text
    leaked = [i for i in identifiers if i in text]
    assert not leaked, f"patient identifiers in Serve logs: {leaked}"


# ------------------------------------------------------------------ the split topology


@pytest.fixture(scope="module")
def split_server(ray_cluster, artifact):
    """The same model as ``server`` in the split layout: decoding ingress -> model deployment."""
    from ray import serve

    args = ServeArgs(
        model=str(artifact),
        topology="split",
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        ingress=DeploymentArgs(num_replicas=1, max_ongoing_requests=64, max_queued_requests=64,
                               ray_actor_options={"num_cpus": 0}),
        predictor=DeploymentArgs(num_replicas=1, max_ongoing_requests=16, max_queued_requests=32,
                                 ray_actor_options={"num_cpus": 0}),
    )
    url = deploy(args, name=f"{APP}-split", route_prefix="/split")
    yield url
    serve.delete(f"{APP}-split")


def test_split_topology_answers_the_same_and_batches(split_server, server, artifact, samples):
    from ray import serve

    deployments = set(serve.status().applications[f"{APP}-split"].deployments)
    assert deployments == {"CxrIngress", "CxrPredictor"}, deployments
    assert set(serve.status().applications[APP].deployments) == {"CxrIngress"}  # fused: one deployment
    with httpx.Client(base_url=split_server, timeout=120) as client:
        for fmt, (_, content_type) in SAMPLES.items():
            response = client.post("/v1/predict", content=samples[fmt], headers={"Content-Type": content_type})
            assert response.status_code == 200, response.text
            got = [response.json()["probabilities"][c] for c in CLASSES]
            np.testing.assert_allclose(got, reference_probabilities(artifact, samples[fmt]), rtol=1e-5, atol=1e-6)
        explained = client.post("/v1/predict?explain=gradcam", content=samples["png"], headers={"Content-Type": "image/png"})
        assert explained.status_code == 200 and explained.json()["heatmap_png_base64"]
    seen: list[int] = []
    for _ in range(3):
        responses = asyncio.run(_post_concurrently(split_server, samples["png"], 8, 8))
        assert all(r.status_code == 200 for r in responses)
        seen += [r.json()["batch_size"] for r in responses]
        if max(seen) > 1:
            break
    assert 1 < max(seen) <= 8, seen
