"""``POST /v1/predict`` with ``Accept: application/dicom``, for real: Ray Serve on 127.0.0.1, httpx,
pydicom decoding the answer. The SR says what the JSON answer says, is filed under the source's study,
carries the source's PatientID (the JSON never does), and refusals are typed errors, never a crash."""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest
from _serve_testing import deploy, make_artifact
from test_dicom_results import DCIODVFY, SR_STORAGE, dciodvfy_errors

from cxr_ray.dicomnet.sr import read_result
from cxr_ray.serve.config import DeploymentArgs, ServeArgs

APP = "test-serve-sr"
DICOM = {"Content-Type": "application/dicom"}
AS_SR = {**DICOM, "Accept": "application/dicom"}


@pytest.fixture(scope="module")
def client(ray_cluster, tmp_path_factory):
    from ray import serve

    args = ServeArgs(
        model=str(make_artifact(tmp_path_factory.mktemp("serve-sr-model"))),
        ingress=DeploymentArgs(num_replicas=1, ray_actor_options={"num_cpus": 0}),
        predictor=DeploymentArgs(num_replicas=1, ray_actor_options={"num_cpus": 0}),
    )
    url = deploy(args, name=APP, route_prefix="/sr")
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c
    serve.delete(APP)


@pytest.fixture(scope="module")
def samples(real_data_dir):
    return {
        "dicom": (real_data_dir / "rsna-pneumonia-sample.dcm").read_bytes(),
        "png": (real_data_dir / "00000001_000.png").read_bytes(),
        "jpeg": (real_data_dir / "16747_3_1.jpg").read_bytes(),
    }


def _sr(response: httpx.Response) -> pydicom.Dataset:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    return pydicom.dcmread(io.BytesIO(response.content))  # Part-10: preamble, DICM, file meta


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code, response.text
    return response.text


def test_sr_says_what_the_json_says_and_references_the_source(client, samples):
    source = pydicom.dcmread(io.BytesIO(samples["dicom"]), stop_before_pixels=True)
    plain = client.post("/v1/predict", content=samples["dicom"], headers=DICOM)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    body = plain.json()
    sr = _sr(client.post("/v1/predict", content=samples["dicom"], headers=AS_SR))
    assert sr.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID == SR_STORAGE and sr.Modality == "SR"

    said = read_result(sr)
    assert said["predicted_label"] == body["label"]
    assert said["score"] == pytest.approx(body["score"], abs=1e-6)
    assert said["threshold"] == pytest.approx(body["threshold"], abs=1e-6)
    assert said["flagged"] == body["flagged"]
    assert (said["model_name"], said["model_version"]) == (body["model"]["name"], body["model"]["version"])
    # Filed under the source's study, its instance as the source image, its series as evidence.
    assert said["source_sop_instance_uid"] == str(source.SOPInstanceUID)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # The real identifiers travel in the SR, and only there.
    assert source.PatientID and sr.PatientID == source.PatientID
    assert str(sr.PatientName) == str(source.PatientName)
    assert str(source.PatientID) not in plain.text
    # Same input, same model: the same SR (an archive stores a resent one once).
    again = _sr(client.post("/v1/predict", files={"file": ("x.dcm", samples["dicom"], "application/dicom")},
                            headers={"Accept": "application/dicom"}))
    assert again.SOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian: apt-get install dicom3tools)")
def test_the_served_sr_passes_dciodvfy(client, samples, tmp_path):
    response = client.post("/v1/predict", content=samples["dicom"], headers=AS_SR)
    assert response.status_code == 200, response.text
    assert dciodvfy_errors(response.content, tmp_path) == []


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, application/dicom",
                                    "application/dicom;q=0", "application/dicom;q=0.5, application/json"])
def test_without_a_preference_for_dicom_the_answer_stays_json(client, samples, accept):
    headers = DICOM if accept is None else {**DICOM, "Accept": accept}
    response = client.post("/v1/predict", content=samples["dicom"], headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert {"label", "score", "flagged", "threshold", "model"} <= set(response.json())


def test_refusals_are_typed_and_the_replica_keeps_answering(client, samples):
    source = pydicom.dcmread(io.BytesIO(samples["dicom"]))
    for fmt, content_type in (("png", "image/png"), ("jpeg", "image/jpeg")):
        text = _error(client.post("/v1/predict", content=samples[fmt],
                                  headers={"Content-Type": content_type, "Accept": "application/dicom"}),
                      406, "not_acceptable")
        assert "DICOM input" in text
    # A bad DICOM gets the decode error it gets without the Accept header.
    truncated = samples["dicom"][: len(samples["dicom"]) // 3]
    code = client.post("/v1/predict", content=truncated, headers=DICOM).json()["error"]["code"]
    _error(client.post("/v1/predict", content=truncated, headers=AS_SR), 422, code)
    # A heatmap has no place in the SR: refused, not silently dropped.
    _error(client.post("/v1/predict?explain=gradcam", content=samples["dicom"], headers=AS_SR), 400, "bad_request")
    # A header the SR cannot be built from: 422 that names no patient.
    del source.StudyInstanceUID
    broken = io.BytesIO()
    source.save_as(broken)
    text = _error(client.post("/v1/predict", content=broken.getvalue(), headers=AS_SR), 422, "sr_unavailable")
    assert str(source.PatientID) not in text and str(source.PatientName) not in text
    assert client.get("/healthz").status_code == 200
    _sr(client.post("/v1/predict", content=samples["dicom"], headers=AS_SR))


def test_logs_after_sr_requests_carry_no_patient_identifiers(client, samples):
    """The SR holds the identifiers; Serve's logs for SR requests (answered and refused) do not."""
    import time
    from pathlib import Path

    import ray

    source = pydicom.dcmread(io.BytesIO(samples["dicom"]))
    ok = client.post("/v1/predict", content=samples["dicom"], headers=AS_SR)
    assert ok.status_code == 200
    source.ViewPosition = "LL"  # refused: lateral_view, after the header was read
    lateral = io.BytesIO()
    source.save_as(lateral)
    _error(client.post("/v1/predict", content=lateral.getvalue(), headers=AS_SR), 422, "lateral_view")
    identifiers = {str(source.PatientID), str(source.PatientName), str(source.StudyInstanceUID),
                   str(source.SOPInstanceUID)}
    identifiers = {i for i in identifiers if len(i) >= 6}
    request_id = ok.headers["x-request-id"]
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 30
    while True:  # log files are written asynchronously
        text = "\n".join(p.read_text(errors="replace") for p in logs_dir.glob("*.log"))
        if f"request_id={request_id}" in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert f"request_id={request_id}" in text
    leaked = [i for i in identifiers if i in text]
    assert not leaked, f"patient identifiers in Serve logs: {leaked}"
