"""The screening job end to end on the session's Ray cluster: one row per input, right codes, resume."""

from __future__ import annotations

import hmac
import json
import os
from hashlib import sha256

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from _screen_testing import (
    CLASSES,
    expected_status,
    make_archive,
    make_artifact,
    read_rows,
    screen_config,
)

from cxr_ray.engines.load import REDUCED_PRECISION_ATOL, load_backend
from cxr_ray.engines.openvino.runtime import openvino_available
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16
from cxr_ray.errors import UsageError
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import preprocess
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.resources import plan_layout
from cxr_ray.screen.schema import prob_column

PROBS = [prob_column(c) for c in CLASSES]
KEY_ENV = "CXR_TEST_PSEUDONYM_KEY"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen-archive")
    labels = make_archive(root, n=40, corrupt_fraction=0.25, seed=5)
    return root, labels


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("screen-model") / "model")



@pytest.fixture(scope="module")
def screened(ray_cluster, archive, artifact, tmp_path_factory):
    """One run over the archive's labels.csv manifest, with a pseudonym key."""
    root, _ = archive
    out = tmp_path_factory.mktemp("screen-out") / "run"
    os.environ[KEY_ENV] = "operator-secret"
    try:
        summary = run_screen(screen_config(artifact, [str(root / "labels.csv")], out, pseudonym_key_env=KEY_ENV))
    finally:
        os.environ.pop(KEY_ENV, None)
    return out, summary


def test_one_row_per_input_with_the_right_status_and_code(archive, screened):
    _, labels = archive
    out, summary = screened
    rows = read_rows(out)
    assert len(rows) == len(labels) == summary["rows"] == summary["inputs"]
    assert rows["path"].is_unique and set(rows["path"]) == set(labels["uri"])
    by_path = labels.set_index("uri")
    for _, row in rows.iterrows():
        label = by_path.loc[row["path"]]
        code = label["expected_error"] if label["corrupt"] else None
        assert row["status"] == expected_status(code), row["path"]
        assert (row["error_code"] if row["status"] != "ok" else None) == code
    ok = rows["status"] == "ok"
    np.testing.assert_allclose(rows.loc[ok, PROBS].sum(axis=1), 1.0, atol=1e-5)
    assert rows.loc[ok, "predicted_label"].isin(CLASSES).all()
    assert rows.loc[~ok, PROBS].isna().all().all() and rows.loc[~ok, "error"].notna().all()
    assert (rows.loc[ok, "flagged"] == (rows.loc[ok, "score"] >= 0.3)).all()
    np.testing.assert_allclose(rows["threshold"], 0.3)


def test_predictions_equal_the_backend_called_directly(artifact, screened):
    out, _ = screened
    rows = read_rows(out)
    ok = rows[rows["status"] == "ok"]
    card = load_card(artifact)
    backend = load_backend(artifact, "onnxruntime", device="cpu", num_threads=1)
    batch = []
    for path in ok["path"]:
        with open(path, "rb") as handle:
            image = decode_image(handle.read(), path.rsplit("/", 1)[-1], target_size=card.image_size)
        batch.append(preprocess(image.pixels, card.preprocess_config))
    direct = backend.predict(np.stack(batch))
    np.testing.assert_allclose(ok[PROBS].to_numpy(), direct, atol=1e-5)
    assert (ok["predicted_label"].to_numpy() == np.asarray(CLASSES)[direct.argmax(axis=1)]).all()


def test_summary_success_marker_and_readers(screened, artifact):
    out, summary = screened
    assert summary["complete"] and (out / "_SUCCESS").exists()
    on_disk = json.loads((out / "_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    rows = read_rows(out)
    assert summary["status"] == {s: int((rows["status"] == s).sum()) for s in ("ok", "error", "skipped")}
    assert summary["predicted_label"] == {c: int((rows["predicted_label"] == c).sum()) for c in CLASSES}
    assert summary["flagged"] == int(rows["flagged"].fillna(False).sum())
    assert summary["model"]["version"] == load_card(artifact).version
    assert summary["backend"] == "onnxruntime" and summary["run_ids"] == [summary["run_id"]]
    assert summary["images_per_s"] > 0
    # DuckDB reads the parts as they are (types included).
    con = duckdb.connect()
    n, ok, ts = con.execute(
        f"select count(*), count(*) filter (where status = 'ok'), typeof(any_value(screened_at)) "
        f"from read_parquet('{out}/parts/*.parquet')"
    ).fetchone()
    assert (n, ok) == (summary["rows"], summary["status"]["ok"]) and ts.startswith("TIMESTAMP")


def test_pseudonyms_are_keyed_hmacs_and_no_identifiers_leak(archive, screened):
    import pydicom

    _, labels = archive
    out, _ = screened
    rows = read_rows(out)
    dicom_ok = rows[(rows["format"] == "dicom") & (rows["status"] == "ok")]
    assert len(dicom_ok)
    for _, row in dicom_ok.iterrows():
        ds = pydicom.dcmread(row["path"], stop_before_pixels=True)
        want = hmac.new(b"operator-secret", str(ds.PatientID).encode(), sha256).hexdigest()
        assert row["patient_pseudonym"] == want
        text = " ".join(str(v) for v in row.drop("path").to_numpy())  # the path is the operator's own
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(tag, "") or "").strip()
            if len(value) > 3:
                assert value not in text, tag
    assert rows.loc[rows["format"] != "dicom", "patient_pseudonym"].isna().all()


def test_rerun_resumes_skips_everything_and_duplicates_nothing(ray_cluster, archive, artifact, screened):
    root, labels = archive
    out, first = screened
    before = read_rows(out)
    again = run_screen(screen_config(artifact, [str(root / "labels.csv")], out, pseudonym_key_env=None))
    after = read_rows(out)
    assert again["complete"] and again["screened_this_run"] == 0 and again["resumed_rows"] == len(labels)
    assert len(after) == len(labels) and after["path"].is_unique
    assert after.equals(before)
    assert again["run_ids"] == [first["run_id"]]  # the second run wrote no rows


def test_resume_screens_only_new_inputs(ray_cluster, archive, artifact, tmp_path):
    root, labels = archive
    images = sorted(labels["uri"])
    manifest = tmp_path / "first.csv"
    pacsv.write_csv(pa.table({"path": images[:15]}), str(manifest))
    out = tmp_path / "out"
    first = run_screen(screen_config(artifact, [str(manifest)], out))
    assert first["rows"] == 15
    second = run_screen(screen_config(artifact, [str(root / "images")], out))
    rows = read_rows(out)
    assert second["complete"] and second["screened_this_run"] == len(labels) - 15
    assert len(rows) == len(labels) and rows["path"].is_unique
    assert sorted(second["run_ids"]) == sorted([first["run_id"], second["run_id"]])


def test_duplicate_and_missing_manifest_entries(ray_cluster, archive, artifact, tmp_path):
    _, labels = archive
    first = labels["uri"].iloc[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{first}\n{first}\n{tmp_path}/gone.dcm\n")
    summary = run_screen(screen_config(artifact, [str(manifest)], tmp_path / "out"))
    rows = read_rows(tmp_path / "out")
    assert summary["complete"] and summary["inputs"] == 3 and summary["rows"] == 2
    assert summary["duplicates_removed"] == 1
    assert rows.set_index("path").loc[f"{tmp_path}/gone.dcm", "error_code"] == "read_failed"


def test_resume_with_another_model_is_refused(ray_cluster, archive, artifact, screened, tmp_path):
    root, _ = archive
    out, _ = screened
    other = make_artifact(tmp_path / "other", name="other", seed=1)
    with pytest.raises(UsageError, match="another model"):
        run_screen(screen_config(other, [str(root / "labels.csv")], out))


def test_bad_usage_fails_before_any_work(ray_cluster, artifact, tmp_path):
    with pytest.raises(UsageError, match="not found"):
        run_screen(screen_config(artifact, [str(tmp_path / "nothing-here")], tmp_path / "out"))
    with pytest.raises(UsageError, match="NOT_SET_ANYWHERE"):
        run_screen(screen_config(artifact, [str(tmp_path)], tmp_path / "out", pseudonym_key_env="NOT_SET_ANYWHERE"))
    assert not (tmp_path / "out" / "parts").exists()


def test_layout_defaults():
    cpu = plan_layout(ScreenConfig(model="m", inputs=["i"], output="o"), {"CPU": 8.0})
    assert cpu.actors == (8, 8) and cpu.threads_per_actor == 1 and cpu.cpus_per_actor == 0.25
    assert cpu.decode_in_actors and cpu.decode_cpus == 0.0  # CPU-only: each actor decodes its own batches
    tasks = plan_layout(ScreenConfig(model="m", inputs=["i"], output="o", decode_cpus=0.5), {"CPU": 8.0})
    assert not tasks.decode_in_actors and tasks.decode_cpus == 0.5  # asking for decode CPUs asks for decode tasks
    gpu = plan_layout(ScreenConfig(model="m", inputs=["i"], output="o", decode="cpu"), {"CPU": 16.0, "GPU": 4.0})
    assert gpu.actors == (1, 4) and gpu.gpus_per_actor == 1.0 and gpu.decode_cpus == 1.0 and not gpu.decode_in_actors
    half = plan_layout(ScreenConfig(model="m", inputs=["i"], output="o", gpus_per_actor=0.5), {"CPU": 16.0, "GPU": 2.0})
    assert half.actors == (1, 4)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no AVX512-BF16 / AMX: --precision bf16 is refused")
def test_bf16_opt_in_records_its_backend_and_stays_close_to_fp32(ray_cluster, archive, artifact, screened, tmp_path):
    root, _ = archive
    out = tmp_path / "bf16"
    summary = run_screen(screen_config(artifact, [str(root / "labels.csv")], out, backend="auto", precision="bf16"))
    rows = read_rows(out).set_index("path")
    fp32 = read_rows(screened[0]).set_index("path")
    ok = rows.index[rows["status"] == "ok"]
    bf16 = "openvino-bf16" if openvino_available() else "torch-bf16"  # auto's first bf16 engine here
    assert summary["backend"] == bf16 and set(rows.loc[ok, "backend"]) == {bf16}
    assert list(ok.sort_values()) == sorted(fp32.index[fp32["status"] == "ok"])
    np.testing.assert_allclose(rows.loc[ok, PROBS].to_numpy(), fp32.loc[ok, PROBS].to_numpy(), atol=REDUCED_PRECISION_ATOL)


def test_decode_tasks_and_decode_in_actors_write_the_same_rows(ray_cluster, archive, artifact, screened, tmp_path):
    """The GPU-cluster layout (decode tasks before the actors), run here on CPUs, against the
    CPU default (each actor decodes its own batches): same rows, statuses, codes and numbers."""
    root, _ = archive
    out = tmp_path / "tasks"
    os.environ[KEY_ENV] = "operator-secret"
    try:
        run_screen(screen_config(artifact, [str(root / "labels.csv")], out, pseudonym_key_env=KEY_ENV, decode_in_actors=False))
    finally:
        os.environ.pop(KEY_ENV, None)
    tasks, fused = read_rows(out), read_rows(screened[0])
    columns = ["path", "status", "error_code", "predicted_label", "patient_pseudonym", "rows", "cols"]
    pd.testing.assert_frame_equal(tasks[columns], fused[columns])
    np.testing.assert_allclose(tasks[PROBS].to_numpy(), fused[PROBS].to_numpy(), rtol=1e-6, atol=1e-7)
