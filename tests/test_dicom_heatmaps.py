"""Heatmaps as DICOM: with ``--heatmaps flagged --dicom-results``, a Secondary Capture (highdicom) of each
flagged ``ok`` DICOM row's overlay, in the source's study and a series of its own, carrying the source's
patient identifiers (and those nowhere else), its pixels the overlay PNG's; in a folder, or in a real
Orthanc by STOW-RS (queried back through QIDO-RS); it validates with dciodvfy; a failed store keeps the row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from _orthanc import free_port
from _screen_testing import CLASSES, IMAGE_SIZE, make_archive, read_rows, screen_config
from PIL import Image
from test_dicom_results import DCIODVFY, dciodvfy_errors
from test_dicomweb import screen_back_into_orthanc

from cxr_ray.dicomnet import web
from cxr_ray.dicomnet.results import part10
from cxr_ray.dicomnet.sc import build_sc, sc_series_uid
from cxr_ray.dicomnet.sr import Result, read_result
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card
from cxr_ray.preprocess import preprocess
from cxr_ray.screen.dicom_results import SC_NOT_STORED
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.schema import HEATMAP_PATH

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
IDENTIFIERS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber")
RESULT = Result("covid", 0.9, 0.3, True, "screen-test", "v123")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc-phantoms")
    return root, make_archive(root, n=12, corrupt_fraction=0.2, seed=23)


def _dicom_sources(real_data_dir: Path, labels) -> list[Path]:
    out = sorted(real_data_dir.glob("*.dcm"))
    for uri in labels["uri"]:
        if str(uri).endswith(".dcm"):
            try:
                pydicom.dcmread(uri).pixel_array  # noqa: B018 - decodable (the archive's broken files are not)
            except Exception:  # noqa: BLE001
                continue
            out.append(Path(uri))
    return out


@pytest.fixture(scope="module")
def artifact(real_data_dir, phantoms, tmp_path_factory):
    """A random-weight resnet18 at 64 px (its scores vary from image to image, unlike the screening tests'
    mobilenet's), its threshold between the middle two covid scores of the decodable DICOM inputs: about
    half of them flagged (an SC each), the other half not."""
    _, labels = phantoms
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    card = new_card(name="sc-test", arch="resnet18", classes=CLASSES, image_size=IMAGE_SIZE, positive_class="covid")
    batch = [preprocess(decode_image(p.read_bytes(), "x", target_size=IMAGE_SIZE).pixels, card.preprocess_config)
             for p in _dicom_sources(real_data_dir, labels)]
    with torch.no_grad():
        scores = sorted(torch.softmax(model(torch.from_numpy(np.stack(batch))), dim=1)[:, 0].tolist())
    middle = len(scores) // 2
    card.thresholds = {"positive": (scores[middle - 1] + scores[middle]) / 2, "chosen_on": "validation"}
    directory = tmp_path_factory.mktemp("sc-model") / "model"
    save_artifact(directory, model, card)
    return str(directory)


def _config(artifact, inputs, output, **overrides):
    return screen_config(artifact, inputs, output, backend="torch", heatmaps="flagged", **overrides)


def _assert_sc_of(sc: pydicom.Dataset, source: pydicom.Dataset, model_name: str, model_version: str) -> None:
    """An SC of ``source``: its study, a series of its own, its size, its patient, naming the model."""
    assert sc.SOPClassUID == SC_STORAGE and sc.Modality == "OT"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == \
        (source.Rows, source.Columns, 3, "RGB")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    for keyword in IDENTIFIERS:  # the source's own values (a Patient's Sex invalid for its VR: left empty)
        want = str(source.get(keyword, "") or "")
        if keyword == "PatientSex" and want not in ("M", "F", "O"):
            want = ""
        assert str(sc.get(keyword, "") or "") == want, keyword
    assert model_name in sc.SeriesDescription and model_version in sc.SeriesDescription
    assert sc.SeriesInstanceUID == sc_series_uid(source.StudyInstanceUID, Result(
        "x", None, 0.0, None, model_name, model_version), "gradcam")  # one series per study and model


def test_sc_content_references_identifiers_and_uids(real_data_dir, phantoms):
    _, labels = phantoms
    for path in _dicom_sources(real_data_dir, labels):
        source = pydicom.dcmread(path)
        rgb = np.zeros((source.Rows, source.Columns, 3), np.uint8)
        rgb[..., 0] = 200
        sc = build_sc(source, rgb, RESULT, "gradcam")
        _assert_sc_of(sc, source, "screen-test", "v123")
        np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(part10(sc))).pixel_array, rgb)
        assert build_sc(source, rgb, RESULT, "gradcam").SOPInstanceUID == sc.SOPInstanceUID  # a rewrite replaces
        newer = Result("covid", 0.9, 0.3, True, "screen-test", "v124")
        assert build_sc(source, rgb, newer, "gradcam").SeriesInstanceUID != sc.SeriesInstanceUID
    with pytest.raises(ValueError, match="uint8"):
        build_sc(source, rgb.astype(np.float32), RESULT, "gradcam")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian: apt-get install dicom3tools)")
def test_scs_pass_dciodvfy(real_data_dir, phantoms, tmp_path):
    _, labels = phantoms
    checked = 0
    for path in _dicom_sources(real_data_dir, labels):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        rgb = np.random.default_rng(0).integers(0, 255, (source.Rows, source.Columns, 3), dtype=np.uint8)
        errors = dciodvfy_errors(part10(build_sc(source, rgb, RESULT, "gradcam")), tmp_path)
        assert errors == [], (path.name, errors)
        checked += 1
    assert checked >= 3


def _scs(folder: Path) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    return [d for d in found if d.SOPClassUID == SC_STORAGE]


def _identifiers(sources) -> set[str]:
    values = {str(s.get(k, "") or "").strip() for s in sources for k in ("PatientID", "PatientName", "AccessionNumber")}
    return {v for v in values if len(v) >= 4}


def test_folder_one_sc_per_flagged_ok_dicom_row_identifiers_only_there(ray_cluster, phantoms, artifact, tmp_path,
                                                                        monkeypatch):
    root, _ = phantoms
    monkeypatch.setenv("CXR_TEST_SC_KEY", "operator-secret")
    out, results = tmp_path / "out", tmp_path / "dicom"
    summary = run_screen(_config(artifact, [str(root / "labels.csv")], out, dicom_results=str(results),
                                 pseudonym_key_env="CXR_TEST_SC_KEY"))
    rows = read_rows(out)
    ok_dicom = rows[(rows["status"] == "ok") & (rows["format"] == "dicom")]
    flagged = ok_dicom[ok_dicom["flagged"].astype(bool)]
    assert 0 < len(flagged) < len(ok_dicom) and (rows["status"] == "error").any()
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in flagged["path"]}
    scs = {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID): sc for sc in _scs(results)}
    assert set(scs) == set(sources)  # exactly the flagged ones: none for unflagged rows or failed decodes
    model_name, model_version = rows["model_name"].iloc[0], rows["model_version"].iloc[0]
    by_path = flagged.set_index("path")
    for uid, sc in scs.items():
        source = pydicom.dcmread(sources[uid], stop_before_pixels=True)
        _assert_sc_of(sc, source, model_name, model_version)
        png = np.asarray(Image.open(by_path.loc[sources[uid], HEATMAP_PATH]))
        np.testing.assert_array_equal(sc.pixel_array, png)  # the overlay the PNG shows, not another drawing
    assert summary["dicom_results"] == {"destination": str(results), "stored": len(ok_dicom), "not_stored": 0,
                                        "secondary_captures": {"stored": len(flagged), "not_stored": 0}}
    assert not any(SC_NOT_STORED in w for ws in rows["warnings"] for w in ws)
    identifiers = _identifiers(pydicom.dcmread(p, stop_before_pixels=True) for p in flagged["path"])
    assert identifiers
    # (the Parquet's path column is the operator's own file path, which here names the phantom patient: the
    # whole output is checked in the DICOMweb test below, whose paths are UIDs)
    outputs = b"".join(p.read_bytes() for p in (out / "_heatmaps").iterdir()) + json.dumps(summary).encode()
    _assert_identifiers_only_in(identifiers, outputs, scs.values())


def _assert_identifiers_only_in(identifiers: set[str], outputs: bytes, scs) -> None:
    assert identifiers
    in_scs = b"".join(part10(sc) for sc in scs)
    for value in identifiers:
        assert value.encode() not in outputs, "a patient identifier in the Parquet / PNGs / summary / run records"
        assert value.encode() in in_scs  # the PACS needs them to file the SC


def test_sc_store_failure_keeps_rows_and_overlays_warns_and_is_counted(ray_cluster, phantoms, artifact, tmp_path):
    root, _ = phantoms
    nowhere = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    summary = run_screen(_config(artifact, [str(root / "labels.csv")], tmp_path / "out", dicom_results=nowhere))
    rows = read_rows(tmp_path / "out")
    flagged = rows[(rows["status"] == "ok") & (rows["format"] == "dicom") & rows["flagged"].fillna(False).astype(bool)]
    assert summary["complete"] and len(rows) == summary["inputs"] and len(flagged)
    assert summary["dicom_results"]["secondary_captures"] == {"stored": 0, "not_stored": len(flagged)}
    assert flagged[HEATMAP_PATH].notna().all()  # the overlay PNG is kept
    for warnings in flagged["warnings"]:
        assert any(w.startswith(f"{SC_NOT_STORED}: STOW-RS") and "ConnectionError" in w for w in warnings), warnings


def test_scs_stored_by_stow_in_their_own_series_under_the_right_studies(ray_cluster, orthanc, real_data_dir, phantoms,
                                                                        artifact, tmp_path):
    run = screen_back_into_orthanc(orthanc, real_data_dir, phantoms,
                                   lambda inputs, out, **kw: run_screen(_config(artifact, inputs, out, **kw)),
                                   tmp_path / "out")
    stored, sources, query, summary, rows = run.stored, run.sources, run.query, run.summary, run.rows
    flagged = {r["path"].rsplit("/", 1)[-1]: r for _, r in rows.iterrows() if r["flagged"]}
    assert 0 < len(flagged) < len(rows)
    assert summary["dicom_results"]["secondary_captures"] == {"stored": len(flagged), "not_stored": 0}
    client = web.client(orthanc.url + "/dicom-web")
    found_scs: dict[str, pydicom.Dataset] = {}
    for study in {s.StudyInstanceUID for s in sources.values()}:  # queried back through QIDO-RS, per study
        series = {f["0020000E"]["Value"][0]: f for f in client.search_for_series(study_instance_uid=study)}
        for found in client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "OT"}):
            series_uid = found["0020000E"]["Value"][0]
            sc = client.retrieve_instance(study, series_uid, found["00080018"]["Value"][0])
            source = sources[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
            assert source.StudyInstanceUID == study and series_uid in series
            _assert_sc_of(sc, source, rows["model_name"].iloc[0], rows["model_version"].iloc[0])
            found_scs[str(source.SOPInstanceUID)] = sc
        in_series = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "OT"})
        assert len({f["0020000E"]["Value"][0] for f in in_series}) <= 1  # one SC series per study and model
        others = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
        sc_series = {sc.SeriesInstanceUID for sc in found_scs.values()}
        assert not sc_series & {f["0020000E"]["Value"][0] for f in others}  # not the SR's series either
        for sr_found in others:  # and the SR of a flagged instance says so
            said = read_result(client.retrieve_instance(study, sr_found["0020000E"]["Value"][0],
                                                        sr_found["00080018"]["Value"][0]))
            assert said["flagged"] == (said["source_sop_instance_uid"] in flagged)
    assert set(found_scs) == set(flagged)  # exactly one SC per flagged instance
    out = tmp_path / "out"
    outputs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + json.dumps(summary).encode()
    _assert_identifiers_only_in(_identifiers(sources[uid] for uid in flagged), outputs, found_scs.values())
    # the SCs are not screening inputs: the same query lists the same instances, and a re-run adds nothing
    assert len(list(web.list_instances(query))) == len(stored)
    again = run_screen(_config(artifact, [query], tmp_path / "out", dicom_results=orthanc.dicomweb))
    assert again["screened_this_run"] == 0 and again["rows"] == len(stored)
