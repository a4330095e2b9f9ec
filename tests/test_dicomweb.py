"""DICOMweb inputs against a real Orthanc: QIDO-RS listing by pages, WADO-RS reads, screening, resume,
``inspect``, auth from named environment variables, and QIDO retries ending in a one-line error."""

from __future__ import annotations

import http.server
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from _screen_testing import make_archive, make_artifact, read_rows, screen_config

from cxr_ray.dicomnet import web
from cxr_ray.errors import UsageError
from cxr_ray.inspect import inspect_inputs
from cxr_ray.screen.job import run_screen


def upload_sources(orthanc, real_data_dir: Path, phantom_root: Path, labels) -> dict[str, Path]:
    """Upload the real sample DICOMs and the phantom archive's DICOMs; {SOP Instance UID: file} of the CR/DX ones."""
    orthanc.clear()
    files = sorted(real_data_dir.glob("*.dcm")) + [Path(u) for u in labels["uri"] if str(u).endswith(".dcm")]
    stored: dict[str, Path] = {}
    uploaded: set[str] = set()
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            uid, modality = str(header.SOPInstanceUID), str(header.get("Modality", ""))
        except Exception:  # noqa: BLE001 - the archive's broken files: Orthanc refuses them too
            continue
        response = orthanc.upload(path, refused_ok=True)
        if response is None:  # a broken phantom (truncated, say) Orthanc refuses: not in the archive
            continue
        assert response["Status"] in ("Success", "AlreadyStored")
        uploaded.add(uid)
        if modality in ("CR", "DX"):  # the others (a CT phantom, say) are stored but not listed by the query
            stored.setdefault(uid, path)  # the two real samples share one SOP Instance UID: one instance
    assert len(uploaded) == len(orthanc.instances())
    return stored


@dataclass
class ScreenedBack:
    """One screening run from Orthanc by QIDO-RS, its DICOM results stored back by STOW-RS."""

    stored: dict[str, Path]  # {SOP Instance UID: source file} uploaded
    sources: dict[str, pydicom.Dataset]  # their headers
    query: str
    summary: dict
    rows: pd.DataFrame


def screen_back_into_orthanc(orthanc, real_data_dir: Path, phantoms, screen, out: Path) -> ScreenedBack:
    """Upload the sources, then ``screen(inputs, output, dicom_results=...)`` them (a run_screen call
    the test configures); every uploaded instance must come back as one ok row."""
    root, labels = phantoms
    stored = upload_sources(orthanc, real_data_dir, root, labels)
    sources = {uid: pydicom.dcmread(p, stop_before_pixels=True) for uid, p in stored.items()}
    query = orthanc.dicomweb + "?ModalitiesInStudy=CR,DX"
    summary = screen([query], out, dicom_results=orthanc.dicomweb)
    rows = read_rows(out)
    assert len(rows) == len(stored) and (rows["status"] == "ok").all()
    return ScreenedBack(stored, sources, query, summary, rows)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb-phantoms")
    return root, make_archive(root, n=16, corrupt_fraction=0.0, seed=11)


@pytest.fixture(scope="module")
def pacs(orthanc, real_data_dir, phantoms):
    root, labels = phantoms
    return orthanc, upload_sources(orthanc, real_data_dir, root, labels)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("dicomweb-model") / "model")


def query(orthanc) -> str:
    return orthanc.dicomweb + "?ModalitiesInStudy=CR,DX"


def test_qido_lists_every_instance_page_by_page(pacs):
    orthanc, stored = pacs
    uris = list(web.list_instances(query(orthanc), page_size=2))  # pages of 2: offsets really walk
    assert len(uris) == len(set(uris))
    assert {u.rsplit("/", 1)[-1] for u in uris} == set(stored)
    where = web.parse(uris[0])
    assert where.study and where.series and where.instance and not where.query
    # a query that matches nothing lists nothing; a date range is passed through to QIDO
    assert list(web.list_instances(orthanc.dicomweb + "?ModalitiesInStudy=MR")) == []


def test_wado_bytes_are_the_stored_instance(pacs):
    orthanc, stored = pacs
    uri = next(iter(web.list_instances(query(orthanc))))
    data = web.retrieve_instance(uri)
    assert data[128:132] == b"DICM"
    source = pydicom.dcmread(stored[uri.rsplit("/", 1)[-1]])
    got = pydicom.dcmread(io.BytesIO(data))
    assert got.SOPInstanceUID == source.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID  # not transcoded
    assert got.PixelData == source.PixelData


def test_inspect_accepts_dicomweb_uris(pacs):
    orthanc, stored = pacs
    records = list(inspect_inputs([query(orthanc)]))
    assert len(records) == len(stored)
    assert all(r["status"] == "ok" and r["modality"] in ("CR", "DX") for r in records), records
    missing = list(inspect_inputs([orthanc.dicomweb + "?ModalitiesInStudy=MR"]))
    assert [r["error_code"] for r in missing] == ["read_failed"]



def test_screen_from_dicomweb_one_row_per_instance_and_resume(ray_cluster, pacs, artifact, tmp_path):
    orthanc, stored = pacs
    out = tmp_path / "out"
    summary = run_screen(screen_config(artifact, [query(orthanc)], out))
    assert summary["complete"]
    rows = read_rows(out)
    assert len(rows) == len(stored)
    assert {p.rsplit("/", 1)[-1] for p in rows["path"]} == set(stored)
    assert (rows["status"] == "ok").all(), rows[["path", "error_code", "error"]]
    assert set(rows["modality"]) <= {"CR", "DX"}
    again = run_screen(screen_config(artifact, [query(orthanc)], out))  # resume: every instance already written
    assert again["complete"]
    assert len(read_rows(out)) == len(stored)
    assert again["resumed_rows"] == len(stored) and again["screened_this_run"] == 0


def test_same_rows_as_screening_the_files(ray_cluster, pacs, artifact, tmp_path):
    orthanc, stored = pacs
    from_pacs = read_rows(_screened(artifact, [query(orthanc)], tmp_path / "pacs"))
    files = tmp_path / "files.csv"
    files.write_text("path\n" + "".join(f"{p}\n" for p in stored.values()))
    from_files = read_rows(_screened(artifact, [str(files)], tmp_path / "files"))
    by_uid = {p.rsplit("/", 1)[-1]: i for i, p in enumerate(from_pacs["path"])}
    for j, path in enumerate(from_files["path"]):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        a, b = from_pacs.iloc[by_uid[uid]], from_files.iloc[j]
        assert a["predicted_label"] == b["predicted_label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)


def _screened(artifact, inputs, out) -> Path:
    assert run_screen(screen_config(artifact, inputs, out))["complete"]
    return out


# --------------------------------------------------------------------------- auth and failures


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A tiny real HTTP server: answers every request with ``status`` and records its headers."""

    status = 200
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append(dict(self.headers))
        body = b"[]"
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def recorder():
    handler = type("Handler", (_Recorder,), {"status": 200, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"dicomweb://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def test_auth_comes_from_the_named_variables(recorder, monkeypatch):
    handler, base = recorder
    monkeypatch.setenv("CXR_TEST_DW_TOKEN", "t0ken-value")
    auth = web.auth_from_env(token_env="CXR_TEST_DW_TOKEN")
    assert "t0ken-value" not in repr(auth)
    assert list(web.list_instances(base + "?StudyDate=20260101-20261231", auth)) == []
    assert handler.seen[-1]["Authorization"] == "Bearer t0ken-value"
    monkeypatch.setenv("CXR_TEST_DW_USER", "alice")
    monkeypatch.setenv("CXR_TEST_DW_PASS", "s3cret")
    basic = web.auth_from_env(user_env="CXR_TEST_DW_USER", password_env="CXR_TEST_DW_PASS")
    list(web.list_instances(base, basic))
    assert handler.seen[-1]["Authorization"].startswith("Basic ")
    with pytest.raises(UsageError, match="CXR_TEST_DW_UNSET"):
        web.auth_from_env(token_env="CXR_TEST_DW_UNSET")
    with pytest.raises(UsageError, match="both"):
        web.auth_from_env(user_env="CXR_TEST_DW_USER")


def test_qido_5xx_is_retried_then_one_line_error_naming_the_query(recorder, monkeypatch):
    handler, base = recorder
    handler.status = 503
    monkeypatch.setattr(web, "BACKOFF_S", 0.01)
    with pytest.raises(web.DicomwebError) as failure:
        list(web.list_instances(base + "?ModalitiesInStudy=CR"))
    message = str(failure.value)
    assert "\n" not in message
    assert "ModalitiesInStudy=CR" in message and f"after {web.ATTEMPTS} attempts" in message and "503" in message
    assert len(handler.seen) == web.ATTEMPTS


def test_qido_4xx_fails_at_once(recorder):
    handler, base = recorder
    handler.status = 400
    with pytest.raises(web.DicomwebError, match="HTTP 400"):
        list(web.list_instances(base))
    assert len(handler.seen) == 1


def test_a_down_server_is_a_clear_error(monkeypatch):
    from _orthanc import free_port

    monkeypatch.setattr(web, "BACKOFF_S", 0.01)
    with pytest.raises(web.DicomwebError, match="ConnectionError"):
        list(web.list_instances(f"dicomweb://127.0.0.1:{free_port()}/dicom-web?ModalitiesInStudy=CR"))


def test_bad_uris_are_usage_errors():
    with pytest.raises(UsageError):
        web.parse("dicomweb:///no-host")
    with pytest.raises(UsageError):
        web.retrieve_instance("dicomweb://127.0.0.1:1/dicom-web/studies/1.2")
    assert web.parse("dicomweb+https://pacs.example:8443/wado?StudyDate=2026").base_url == "https://pacs.example:8443/wado"
    assert os.environ.get("CXR_TEST_DW_TOKEN") is None
