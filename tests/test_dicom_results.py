"""Results as DICOM: Comprehensive SRs (highdicom) that validate, carry the Parquet row's values and the
source's references, land in a real Orthanc by STOW-RS under the right studies, or in a folder; failures
keep their rows; patient identifiers appear in the SRs and nowhere else."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from _screen_testing import make_archive, make_artifact, read_rows, screen_config
from test_dicomweb import screen_back_into_orthanc, upload_sources

from cxr_ray.dicomnet import web
from cxr_ray.dicomnet.sr import SCHEME, Result, build_sr, read_result
from cxr_ray.screen.dicom_results import NOT_STORED
from cxr_ray.screen.job import run_screen

DCIODVFY = shutil.which("dciodvfy")
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("results-phantoms")
    return root, make_archive(root, n=14, corrupt_fraction=0.3, seed=21)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("results-model") / "model")


def _sources(real_data_dir: Path, labels) -> list[Path]:
    out = sorted(real_data_dir.glob("*.dcm"))
    for uri in labels["uri"]:
        if str(uri).endswith(".dcm"):
            try:
                pydicom.dcmread(uri, stop_before_pixels=True).SOPInstanceUID  # noqa: B018 - readable?
            except Exception:  # noqa: BLE001 - the archive's broken files
                continue
            out.append(Path(uri))
    return out


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def _part10(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_sr_content_references_and_identifiers(real_data_dir, phantoms):
    _, labels = phantoms
    for path in _sources(real_data_dir, labels):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        result = Result("covid", 0.625, 0.3, True, "screen-test", "v123")
        sr = build_sr(source, result)
        assert sr.SOPClassUID == SR_STORAGE and sr.Modality == "SR"
        assert sr.StudyInstanceUID == source.StudyInstanceUID  # filed under the source's study...
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID  # ...in a series of its own
        assert sr.PatientID == source.PatientID and str(sr.PatientName) == str(source.PatientName)
        said = read_result(sr)
        assert said == {"predicted_label": "covid", "score": 0.625, "threshold": 0.3, "flagged": True,
                        "model_name": "screen-test", "model_version": "v123",
                        "source_sop_instance_uid": str(source.SOPInstanceUID)}
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert build_sr(source, result).SOPInstanceUID == sr.SOPInstanceUID  # a rewrite replaces
        assert build_sr(source, Result("normal", 0.1, 0.3, False, "screen-test", "v124")).SOPInstanceUID != \
            sr.SOPInstanceUID


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian: apt-get install dicom3tools)")
def test_srs_pass_dciodvfy(real_data_dir, phantoms, tmp_path):
    _, labels = phantoms
    checked = 0
    for path in _sources(real_data_dir, labels):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        for result in (Result("covid", 0.9, 0.3, True, "m", "v"), Result("normal", 0.1, 0.3, False, "m", "v")):
            errors = dciodvfy_errors(_part10(build_sr(source, result)), tmp_path)
            assert errors == [], (path.name, errors)
            checked += 1
    assert checked >= 4



def test_folder_results_one_sr_per_ok_dicom_row_none_for_failures(ray_cluster, phantoms, artifact, tmp_path):
    root, labels = phantoms
    results = tmp_path / "srs"
    summary = run_screen(screen_config(artifact, [str(root / "labels.csv")], tmp_path / "out", dicom_results=str(results)))
    rows = read_rows(tmp_path / "out")
    ok_dicom = rows[(rows["status"] == "ok") & (rows["format"] == "dicom")]
    assert (rows["status"] == "error").any() and len(ok_dicom) >= 3  # failures present, and SR-able rows
    written = {}
    for path in results.glob("*.dcm"):
        said = read_result(pydicom.dcmread(path))
        written[said["source_sop_instance_uid"]] = said
    assert len(written) == len(ok_dicom) == len(list(results.glob("*.dcm")))
    for _, row in ok_dicom.iterrows():
        uid = str(pydicom.dcmread(row["path"], stop_before_pixels=True).SOPInstanceUID)
        _assert_same(written[uid], row)
    assert summary["dicom_results"] == {"destination": str(results), "stored": len(ok_dicom), "not_stored": 0}


def _assert_same(said: dict, row) -> None:
    assert said["predicted_label"] == row["predicted_label"]
    assert said["score"] == pytest.approx(float(row["score"]), abs=1e-6)
    assert said["threshold"] == pytest.approx(float(row["threshold"]), abs=1e-6)
    assert said["flagged"] == bool(row["flagged"])
    assert (said["model_name"], said["model_version"]) == (row["model_name"], row["model_version"])


def test_srs_stored_by_stow_under_the_right_studies(ray_cluster, orthanc, real_data_dir, phantoms, artifact,
                                                    tmp_path):
    run = screen_back_into_orthanc(orthanc, real_data_dir, phantoms,
                                   lambda inputs, out, **kw: run_screen(screen_config(artifact, inputs, out, **kw)),
                                   tmp_path / "out")
    stored, sources, query, summary, rows = run.stored, run.sources, run.query, run.summary, run.rows
    assert summary["dicom_results"]["stored"] == len(stored) and summary["dicom_results"]["not_stored"] == 0
    client = web.client(orthanc.url + "/dicom-web")
    by_source = {}
    for study in {s.StudyInstanceUID for s in sources.values()}:  # queried back through QIDO-RS, per study
        for found in client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"}):
            sr = client.retrieve_instance(study, found["0020000E"]["Value"][0], found["00080018"]["Value"][0])
            said = read_result(sr)
            assert sources[said["source_sop_instance_uid"]].StudyInstanceUID == study
            by_source[said["source_sop_instance_uid"]] = said
    assert set(by_source) == set(stored)
    for _, row in rows.iterrows():
        _assert_same(by_source[row["path"].rsplit("/", 1)[-1]], row)
    # the SRs are not screening inputs: the same query lists the same instances, and a re-run adds nothing
    assert len(list(web.list_instances(query))) == len(stored)
    again = run_screen(screen_config(artifact, [query], tmp_path / "out", dicom_results=orthanc.dicomweb))
    assert again["screened_this_run"] == 0 and again["rows"] == len(stored)


def test_patient_identifiers_only_in_the_srs(ray_cluster, orthanc, real_data_dir, phantoms, artifact, tmp_path,
                                              monkeypatch):
    root, labels = phantoms
    stored = upload_sources(orthanc, real_data_dir, root, labels)
    identifiers = set()
    for path in stored.values():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
            value = str(source.get(keyword, "") or "").strip()
            if len(value) >= 4:
                identifiers.add(value)
    assert identifiers
    monkeypatch.setenv("CXR_TEST_RESULTS_KEY", "operator-secret")
    out, srs = tmp_path / "out", tmp_path / "srs"
    summary = run_screen(screen_config(artifact, [orthanc.dicomweb + "?ModalitiesInStudy=CR,DX"], out,
                                 dicom_results=str(srs), pseudonym_key_env="CXR_TEST_RESULTS_KEY"))
    outputs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + json.dumps(summary).encode()
    for value in identifiers:
        assert value.encode() not in outputs, "a patient identifier in the Parquet / summary / run records"
    in_srs = b"".join(p.read_bytes() for p in srs.glob("*.dcm"))
    assert all(value.encode() in in_srs for value in identifiers)  # the PACS needs them to file the SR
    assert read_rows(out)["patient_pseudonym"].notna().all()


def test_stow_failure_keeps_rows_warns_and_is_counted(ray_cluster, phantoms, artifact, tmp_path):
    from _orthanc import free_port

    root, _ = phantoms
    nowhere = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    summary = run_screen(screen_config(artifact, [str(root / "labels.csv")], tmp_path / "out", dicom_results=nowhere))
    rows = read_rows(tmp_path / "out")
    ok_dicom = rows[(rows["status"] == "ok") & (rows["format"] == "dicom")]
    assert summary["complete"] and len(rows) == summary["inputs"]
    assert summary["dicom_results"] == {"destination": nowhere, "stored": 0, "not_stored": len(ok_dicom)}
    for warnings in ok_dicom["warnings"]:
        assert any(w.startswith(f"{NOT_STORED}: STOW-RS") and "ConnectionError" in w for w in warnings), warnings
    others = rows[~rows.index.isin(ok_dicom.index)]
    assert not any(NOT_STORED in w for ws in others["warnings"] for w in ws)


def test_private_codes_are_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert SCHEME in readme
    assert requests is not None
