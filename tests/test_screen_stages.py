"""The screening stages as plain functions: decode, predict, write, resume set, de-duplication (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _screen_testing import CLASSES, IMAGE_SIZE, expected_status, make_archive, make_artifact

from cxr_ray.engines.load import load_backend
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import PreprocessConfig, preprocess
from cxr_ray.screen.inputs import DoneSet, path_digests
from cxr_ray.screen.output import OutputLayout, part_name
from cxr_ray.screen.schema import (
    INFERENCE_FAILED,
    output_schema,
    pixels_array,
    prob_column,
    prob_columns,
    status_for,
)
from cxr_ray.screen.stages import Predictor, decode_batch, write_batch
from cxr_ray.screen.summary import remove_duplicates, scan_parts


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("archive"), n=24, corrupt_fraction=0.3, seed=11)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def decoded(archive, artifact):
    paths = [*archive["uri"], str(archive["uri"].iloc[0]) + ".missing"]
    table = pa.table({"path": paths})
    return decode_batch(table, preprocessing=load_card(artifact).preprocessing, pseudonym_key=b"k")


def test_status_vocabulary():
    assert status_for(None) == "ok"
    assert status_for("lateral_view") == status_for("unsupported_modality") == "skipped"
    assert status_for("truncated") == status_for("read_failed") == status_for(INFERENCE_FAILED) == "error"
    assert prob_column("Other disease") == "prob_other_disease"
    with pytest.raises(ValueError, match="collide"):
        prob_columns(["a b", "a-b"])


def test_decode_batch_gives_one_row_per_file_with_the_expected_codes(archive, decoded):
    rows = decoded.drop(["pixels"]).to_pandas()
    assert len(rows) == len(archive) + 1
    expected = [e if c else None for c, e in zip(archive["corrupt"], archive["expected_error"], strict=True)]
    assert decoded.column("error_code").to_pylist() == [*expected, "read_failed"]
    assert decoded.column("status").to_pylist() == [*map(expected_status, expected), "error"]
    missing = rows.iloc[-1]
    assert (missing["status"], missing["error_code"]) == ("error", "read_failed")
    # Messages name the file, never the directories above it (they may hold PHI).
    for message in rows["error"].dropna():
        assert str(archive["uri"].iloc[0]).rsplit("/", 2)[0] not in message
    # Failed rows carry zeros, never stale pixels; ok rows carry the preprocessed image.
    pixels = pixels_array(decoded, IMAGE_SIZE)
    assert pixels.shape == (len(rows), 1, IMAGE_SIZE, IMAGE_SIZE)
    failed = (rows["status"] != "ok").to_numpy()
    assert not pixels[failed].any() and pixels[~failed].std() > 0
    dicom_ok = rows[(rows["format"] == "dicom") & (rows["status"] == "ok")]
    assert dicom_ok["patient_pseudonym"].str.len().eq(64).all()


def test_predictor_predicts_ok_rows_and_passes_errors_through(artifact, decoded, archive):
    predictor = Predictor(artifact, "onnxruntime", run_id="r1", device="cpu", num_threads=1)
    out = predictor(decoded)
    assert out.schema == output_schema(CLASSES)
    rows = out.to_pandas()
    ok = rows["status"] == "ok"
    probs = rows[[prob_column(c) for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs[ok].sum(axis=1), 1.0, atol=1e-5)
    assert np.isnan(probs[~ok]).all() and rows.loc[~ok, "predicted_label"].isna().all()
    assert rows.loc[~ok, "error_code"].tolist() == decoded.column("error_code").to_pandas()[~ok].tolist()
    assert (rows.loc[ok, "flagged"] == (rows.loc[ok, "score"] >= 0.3)).all()
    assert set(rows["backend"]) == {"onnxruntime"} and set(rows["run_id"]) == {"r1"}

    # The same numbers as the backend called directly on the same decode + preprocess.
    card = load_card(artifact)
    backend = load_backend(artifact, "onnxruntime", device="cpu", num_threads=1)
    first_ok = rows[ok].iloc[:3]
    batch = []
    for path in first_ok["path"]:
        with open(path, "rb") as handle:
            image = decode_image(handle.read(), path.rsplit("/", 1)[-1], target_size=card.image_size)
        batch.append(preprocess(image.pixels, card.preprocess_config))
    np.testing.assert_allclose(first_ok[[prob_column(c) for c in CLASSES]].to_numpy(), backend.predict(np.stack(batch)), atol=1e-6)


def test_a_model_failure_becomes_inference_failed_rows(artifact, archive):
    """A real model error (input the network cannot take) is recorded per row, not lost."""
    wrong = PreprocessConfig(image_size=IMAGE_SIZE // 2).to_dict()  # the backend refuses (N, 1, 32, 32)
    table = decode_batch(pa.table({"path": list(archive["uri"][:6])}), preprocessing=wrong)
    predictor = Predictor(artifact, "torch", run_id="r2", device="cpu", num_threads=1)
    predictor.image_size = IMAGE_SIZE // 2  # read the 32 px pixels the decode stage wrote
    rows = predictor(table).to_pandas()
    decoded_ok = table.column("status").to_pandas() == "ok"
    assert decoded_ok.any()
    assert (rows.loc[decoded_ok, "error_code"] == INFERENCE_FAILED).all()
    assert (rows.loc[decoded_ok, "status"] == "error").all()
    assert rows.loc[decoded_ok, "error"].str.contains("expected a batch of shape").all()
    assert len(rows) == 6


def test_parts_are_atomic_content_addressed_and_idempotent(tmp_path, artifact, decoded):
    predictor = Predictor(artifact, "onnxruntime", run_id="r3", device="cpu", num_threads=1)
    rows = predictor(decoded)
    out = str(tmp_path / "out")
    first = write_batch(rows, output=out)
    again = write_batch(rows, output=out)  # a retried task writes the same batch again
    assert first.column("part").to_pylist() == again.column("part").to_pylist()
    layout = OutputLayout(out)
    parts = layout.list_parts()
    assert len(parts) == 1 and parts[0].endswith(first.column("part")[0].as_py())
    table = pq.read_table(parts[0])
    assert table.num_rows == len(rows) and table.column("path").to_pylist() == sorted(rows.column("path").to_pylist())
    assert part_name(sorted(rows.column("path").to_pylist())) == first.column("part")[0].as_py()
    assert not [p for p in (tmp_path / "out" / "parts").iterdir() if p.name.startswith(".")]


def test_done_set_and_duplicate_removal(tmp_path, artifact, decoded):
    paths = decoded.column("path").to_pylist()
    done = DoneSet(path_digests(paths[:5]))
    mask = done.contains(path_digests(paths))
    assert mask[:5].all() and not mask[5:].any() and len(done) == 5

    predictor = Predictor(artifact, "onnxruntime", run_id="r4", device="cpu", num_threads=1)
    rows = predictor(decoded)
    out = str(tmp_path / "dups")
    write_batch(rows.slice(0, 10), output=out)
    write_batch(rows.slice(5, 10), output=out)  # rows 5..9 twice
    layout = OutputLayout(out)
    scan = scan_parts(layout)
    assert scan.rows == 20 and sum(len(r) for r in scan.duplicates().values()) == 5
    assert remove_duplicates(layout, scan) == 5
    again = scan_parts(layout)
    assert again.rows == 15 and not again.duplicates()
    assert len(again.done_set()) == 15


def test_an_unreadable_part_is_moved_aside_not_trusted(tmp_path, artifact, decoded):
    predictor = Predictor(artifact, "onnxruntime", run_id="r5", device="cpu", num_threads=1)
    out = tmp_path / "out"
    write_batch(predictor(decoded).slice(0, 4), output=str(out))
    (out / "parts" / "part-0000torn.parquet").write_bytes(b"PAR1 not really a parquet file")
    scan = scan_parts(OutputLayout(str(out)))
    assert scan.rows == 4 and len(scan.parts) == 1
    assert [p.rsplit("/", 1)[-1] for p in scan.quarantined] == ["part-0000torn.parquet.unreadable"]
    assert (out / "_quarantine" / "part-0000torn.parquet.unreadable").exists()
    assert not (out / "parts" / "part-0000torn.parquet").exists()
