"""``cxr-ray inspect`` and ``inspect_inputs``: one record per file, whatever is wrong with it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_decode_dicom import PATIENT_ID, make_dicom

from cxr_ray.cli import main
from cxr_ray.inspect import RECORD_FIELDS, inspect_inputs
from cxr_ray.io.pseudonym import pseudonymize


def png(shape=(16, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def archive(tmp_path):
    root = tmp_path / "archive"
    (root / "study1").mkdir(parents=True)
    (root / "study2" / "series").mkdir(parents=True)
    files = {
        "study1/frontal.dcm": make_dicom(),
        "study1/lateral.dcm": make_dicom(view="LL"),
        "study1/IM0003": make_dicom(view=None),
        "study2/chest.png": png(),
        "study2/notes.png": b"not an image at all\n",
        "study2/series/empty.jpg": b"",
    }
    for relative, data in files.items():
        (root / relative).write_bytes(data)
    return root


def by_name(records):
    return {record["path"].rsplit("/", 1)[-1]: record for record in records}


def test_directory_is_expanded_recursively_one_record_per_file(archive):
    records = list(inspect_inputs([str(archive)]))
    assert len(records) == 6
    for record in records:
        assert tuple(record) == RECORD_FIELDS
        json.dumps(record)  # JSON-ready as is
    got = by_name(records)
    assert got["frontal.dcm"]["status"] == "ok" and got["frontal.dcm"]["view_position"] == "PA"
    assert got["frontal.dcm"]["format"] == "dicom" and got["frontal.dcm"]["rows"] == 48
    assert got["IM0003"]["status"] == "ok"
    assert got["IM0003"]["warnings"] == ["no ViewPosition; assumed frontal"]
    assert got["chest.png"]["format"] == "png"
    assert (got["lateral.dcm"]["status"], got["lateral.dcm"]["error_code"]) == (
        "error",
        "lateral_view",
    )
    assert got["notes.png"]["error_code"] == "not_an_image"
    assert got["empty.jpg"]["error_code"] == "empty"
    assert got["lateral.dcm"]["modality"] is None and got["lateral.dcm"]["warnings"] == []
    assert "lateral.dcm" in got["lateral.dcm"]["error"]


def test_globs_and_single_files(archive):
    records = list(
        inspect_inputs([str(archive / "study1" / "*.dcm"), str(archive / "study2" / "chest.png")])
    )
    assert sorted(by_name(records)) == ["chest.png", "frontal.dcm", "lateral.dcm"]


def test_missing_inputs_and_unreadable_files_are_read_failed(archive, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"path\n{archive / 'study1' / 'frontal.dcm'}\n{tmp_path / 'gone.dcm'}\n{archive}\n"
    )
    records = list(inspect_inputs([str(tmp_path / "nope"), str(manifest)]))
    assert [r["status"] for r in records] == ["error", "ok", "error", "error"]
    assert [r["error_code"] for r in records] == ["read_failed", None, "read_failed", "read_failed"]
    assert records[0]["path"] == str(tmp_path / "nope")


def test_pseudonyms_only_with_a_key(archive):
    plain = by_name(inspect_inputs([str(archive / "study1" / "frontal.dcm")]))["frontal.dcm"]
    assert plain["patient_pseudonym"] is None
    keyed = by_name(
        inspect_inputs([str(archive / "study1" / "frontal.dcm")], pseudonym_key=b"s3cret")
    )
    assert keyed["frontal.dcm"]["patient_pseudonym"] == pseudonymize(PATIENT_ID, b"s3cret")
    assert PATIENT_ID not in json.dumps(keyed)


def test_cli_prints_one_json_line_per_file_and_exits_0(archive, capsys, monkeypatch):
    monkeypatch.setenv("CXR_TEST_KEY", "s3cret")
    status = main(
        [
            "inspect",
            str(archive),
            str(archive / "missing.dcm"),
            "--json",
            "--pseudonym-key-env",
            "CXR_TEST_KEY",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 7
    assert {r["status"] for r in records} == {"ok", "error"}
    assert by_name(records)["frontal.dcm"]["patient_pseudonym"] == pseudonymize(
        PATIENT_ID, b"s3cret"
    )
    assert PATIENT_ID not in out and "s3cret" not in out


def test_cli_usage_errors_exit_2(archive, capsys, monkeypatch):
    monkeypatch.delenv("CXR_TEST_UNSET", raising=False)
    assert main(["inspect", str(archive), "--pseudonym-key-env", "CXR_TEST_UNSET"]) == 2
    assert "CXR_TEST_UNSET" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["inspect"])
    assert info.value.code == 2
