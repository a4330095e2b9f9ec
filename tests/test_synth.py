"""The phantom archive generator: files, labels, masks, determinism, learnability, decoding."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cxr_ray import cli
from cxr_ray.errors import DECODE_ERROR_CODES, UsageError
from cxr_ray.synth import LABEL_COLUMNS, assign_patterns, generate_archive
from cxr_ray.synth.patterns import Pattern
from cxr_ray.synth.phantom import render_chest, sample_anatomy, sample_pose
from cxr_ray.synth.writers import jpeg2000_available

HAS_DECODE = importlib.util.find_spec("cxr_ray.io.decode") is not None
LESION_CLASSES = {"covid", "pneumonia"}


def _read_labels(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "labels.csv", keep_default_na=False, dtype={"corrupt": bool})


def _image_shape(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("phantom") / "archive"
    labels = generate_archive(out, n=72, corrupt_fraction=0.17, seed=7, size=256)
    return out, labels


# ----------------------------------------------------------------------------- labels and files


def test_labels_csv_matches_files(archive):
    out, returned = archive
    labels = _read_labels(out)
    assert list(labels.columns) == LABEL_COLUMNS
    assert len(labels) == 72 and len(returned) == 72
    assert labels["path"].tolist() == returned["path"].tolist()
    # every file under images/ is listed exactly once, and nothing else is
    assert labels["path"].is_unique
    assert set(labels["path"]) == {f"images/{p}" for p in _files_under(out / "images")}
    assert all(not os.path.isabs(p) for p in labels["path"])

    good = labels[~labels["corrupt"]]
    bad = labels[labels["corrupt"]]
    assert len(bad) == round(72 * 0.17)
    assert set(good["label"]) == {"covid", "pneumonia", "normal"}
    assert set(good["format"]) == {"dicom", "png", "jpeg"}
    assert set(good["view"]) <= {"PA", "AP"}
    assert (good["expected_error"] == "").all() and (good["mask_path"] != "").all()
    # masks: one per image, same size as the image
    assert set(good["mask_path"]) == {f"masks/{p}" for p in _files_under(out / "masks")}
    for row in good.itertuples():
        mask = np.asarray(Image.open(out / row.mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.shape == _image_shape(out / row.path), row.path
    # corrupt rows: no label, no mask, a valid expected decode error, all six kinds present
    assert (bad["label"] == "").all() and (bad["mask_path"] == "").all()
    assert set(bad["expected_error"]) <= DECODE_ERROR_CODES
    assert set(bad["variant"]) == {
        "truncated_dicom", "random_bytes", "empty_file", "text_as_png", "lateral_dicom", "ct_dicom"
    }
    assert set(bad["expected_error"]) == {"truncated", "not_an_image", "empty", "lateral_view", "unsupported_modality"}
    params = json.loads((out / "synth.json").read_text())
    assert params["seed"] == 7 and params["patterns"]["covid"] == "ground_glass"


def test_patients_have_2_to_4_images_one_label_and_stable_anatomy(archive):
    out, _ = archive
    good = _read_labels(out).query("~corrupt")
    per_patient = good.groupby("patient_id")
    counts = per_patient.size()
    assert counts.iloc[:-1].between(2, 4).all() and counts.iloc[-1] <= 4  # the last may be cut short
    assert (per_patient["label"].nunique() == 1).all()
    # body habitus (image aspect) is a patient-level trait
    widths = good.assign(width=[_image_shape(out / p)[1] for p in good["path"]]).groupby("patient_id")["width"]
    assert (widths.nunique() == 1).all()
    assert good.assign(width=[_image_shape(out / p)[1] for p in good["path"]])["width"].nunique() > 1


def test_masks_non_empty_exactly_for_lesion_classes(archive):
    out, _ = archive
    good = _read_labels(out).query("~corrupt")
    for row in good.itertuples():
        has_lesion = bool(np.asarray(Image.open(out / row.mask_path)).any())
        assert has_lesion == (row.label in LESION_CLASSES), (row.path, row.label)


@pytest.mark.parametrize("label", ["covid", "pneumonia"])
def test_masks_lie_inside_the_lungs_with_the_class_layout(label):
    pattern = assign_patterns(["covid", "pneumonia", "normal"])[label]
    for i in range(12):
        rng = np.random.default_rng([99, i])
        rendered = render_chest(sample_anatomy(rng), sample_pose(rng, "PA"), pattern, rng, 256)
        assert rendered.mask.shape == rendered.image.shape == rendered.lung.shape
        assert rendered.mask.sum() > 50
        assert not (rendered.mask & ~rendered.lung).any(), "lesion mask leaks outside the lung fields"
        half = rendered.mask.shape[1] // 2
        sides = (rendered.mask[:, :half].any(), rendered.mask[:, half:].any())
        if label == "covid":
            assert all(sides), "ground-glass opacities are bilateral"
            rows = np.nonzero(rendered.mask.any(axis=1))[0]
            lung_rows = np.nonzero(rendered.lung.any(axis=1))[0]
            assert rows.mean() > lung_rows.mean(), "covid opacities favour the lower zones"
        else:
            assert sum(sides) == 1, "a lobar consolidation is in one lung"
            # it is denser than the same place on the lungs' average
            assert rendered.image[rendered.mask].mean() > rendered.image[rendered.lung & ~rendered.mask].mean() + 0.1


def test_normal_has_empty_mask_and_clear_lungs():
    rng = np.random.default_rng(5)
    rendered = render_chest(sample_anatomy(rng), sample_pose(rng, "AP"), Pattern("normal", "clear"), rng, 200)
    assert not rendered.mask.any() and rendered.lung.any()
    assert rendered.image.dtype == np.float32 and 0.0 <= rendered.image.min() <= rendered.image.max() <= 1.0


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_archives(tmp_path):
    kwargs = dict(n=30, corrupt_fraction=0.2, size=128)
    generate_archive(tmp_path / "a", seed=3, **kwargs)
    generate_archive(tmp_path / "b", seed=3, **kwargs)
    generate_archive(tmp_path / "c", seed=4, **kwargs)
    files_a, files_b = _files_under(tmp_path / "a"), _files_under(tmp_path / "b")
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    differing = [
        rel
        for rel in files_a & _files_under(tmp_path / "c")
        if rel.startswith("images/") and (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    ]
    assert differing, "a different seed must give different images"


# ----------------------------------------------------------------------------- DICOM realism


def test_dicom_variety_and_identifiers(tmp_path):
    labels = generate_archive(tmp_path, n=60, formats="dcm", seed=11, size=128)
    seen: dict[str, set] = {k: set() for k in ("modality", "photometric", "bits", "syntax", "rescale", "window", "ext")}
    for row in labels.itertuples():
        ds = pydicom.dcmread(tmp_path / row.path)
        sop = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[ds.Modality]
        assert ds.SOPClassUID == sop and ds.file_meta.MediaStorageSOPClassUID == sop
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PatientID == row.patient_id and ds.ViewPosition == row.view
        assert ds.StudyInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
        assert "StudyTime" not in ds and "ContentTime" not in ds and "InstanceCreationTime" not in ds
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and int(pixels.max()) < (1 << ds.BitsStored)
        seen["modality"].add(ds.Modality)
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["bits"].add(int(ds.BitsStored))
        seen["syntax"].add(ds.file_meta.TransferSyntaxUID.name)
        seen["rescale"].add("RescaleSlope" in ds)
        seen["window"].add("WindowCenter" in ds)
        seen["ext"].add(Path(row.path).suffix)
    assert seen["modality"] == {"CR", "DX"}
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["bits"] == {12, 14, 16}
    expected_syntaxes = {"Explicit VR Little Endian", "Implicit VR Little Endian", "RLE Lossless"}
    if jpeg2000_available():
        expected_syntaxes.add("JPEG 2000 Image Compression (Lossless Only)")
    assert seen["syntax"] == expected_syntaxes
    assert seen["rescale"] == {True, False} and seen["window"] == {True, False}
    assert seen["ext"] == {".dcm", ""}, "some DICOM files have no extension"


def test_png_and_jpeg_variants(tmp_path):
    labels = generate_archive(tmp_path, n=40, formats="png,jpg", seed=2, size=96)
    modes = {(row.format, Image.open(tmp_path / row.path).mode) for row in labels.itertuples()}
    assert {("png", "L"), ("png", "RGB"), ("jpeg", "L")} <= modes
    assert any(fmt == "png" and mode.startswith("I") for fmt, mode in modes), f"no 16-bit PNG in {modes}"


# ----------------------------------------------------------------------------- learnability


def test_class_signal_is_learnable_by_a_linear_model(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    labels = generate_archive(tmp_path, n=150, formats="png", seed=0, size=256)
    features = []
    for path in labels["path"]:
        small = Image.open(tmp_path / path).convert("F").resize((32, 32), Image.Resampling.BILINEAR)
        pixels = np.asarray(small, dtype=np.float32).ravel()
        features.append((pixels - pixels.mean()) / (pixels.std() + 1e-6))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    with threadpool_limits(1):  # BLAS threads only fight each other on a tiny problem
        scores = cross_val_score(
            model,
            np.stack(features),
            np.asarray(labels["label"], dtype=object),
            groups=np.asarray(labels["patient_id"], dtype=object),  # patient-level folds
            cv=GroupKFold(n_splits=5),
        )
    # chance is 1/3; logistic regression on 32x32 pixels reaches ~0.8 on this seed
    assert scores.mean() >= 0.6, scores


# ----------------------------------------------------------------------------- decoding contract


@pytest.mark.skipif(not HAS_DECODE, reason="cxr_ray.io.decode is not written yet")
def test_every_file_decodes_or_fails_with_its_expected_code(archive):
    from cxr_ray.errors import DecodeError
    from cxr_ray.io.decode import decode_image

    out, _ = archive
    for row in _read_labels(out).itertuples():
        data = (out / row.path).read_bytes()
        if row.corrupt:
            with pytest.raises(DecodeError) as info:
                decode_image(data, row.path)
            assert info.value.code == row.expected_error, (row.path, row.variant, info.value.message)
        else:
            decoded = decode_image(data, row.path)
            assert decoded.pixels.shape == _image_shape(out / row.path)
            assert decoded.meta.format == row.format


@pytest.mark.skipif(not HAS_DECODE, reason="cxr_ray.io.decode is not written yet")
def test_decoded_dicom_matches_the_png_of_the_same_phantom(tmp_path):
    """Rendering does not depend on the format: MONOCHROME1, rescale and window must decode to the same picture."""
    from cxr_ray.io.decode import decode_image

    dcm = generate_archive(tmp_path / "dcm", n=24, formats="dcm", seed=5, size=128)
    png = generate_archive(tmp_path / "png", n=24, formats="png", seed=5, size=128)
    for a, b in zip(dcm.itertuples(), png.itertuples(), strict=True):
        x = decode_image((tmp_path / "dcm" / a.path).read_bytes(), a.path).pixels
        y = decode_image((tmp_path / "png" / b.path).read_bytes(), b.path).pixels
        assert x.shape == y.shape
        corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert corr > 0.98, (a.path, a.variant, corr)


# ----------------------------------------------------------------------------- classes and patterns


def test_any_class_names_get_distinct_patterns():
    patterns = assign_patterns(["covid", "pneumonia", "normal"])
    assert [p.kind for p in patterns.values()] == ["ground_glass", "consolidation", "clear"]
    seven = ["COVID-19", "Pneumonia", "Pulmonary Edema", "Pleural Effusion", "COPD", "Pulmonary Fibrosis", "Normal"]
    kinds = {name: p.kind for name, p in assign_patterns(seven).items()}
    assert kinds == {
        "COVID-19": "ground_glass",
        "Pneumonia": "consolidation",
        "Pulmonary Edema": "edema",
        "Pleural Effusion": "effusion",
        "COPD": "emphysema",
        "Pulmonary Fibrosis": "fibrosis",
        "Normal": "clear",
    }
    many = [f"class_{i}" for i in range(15)] + ["covid", "covid19"]
    assigned = assign_patterns(many)
    assert len({(p.kind, p.variant) for p in assigned.values()}) == len(many)
    assert assigned["covid"].kind == "ground_glass" and assigned["covid19"].kind != "ground_glass"
    assert assign_patterns(many) == assigned  # deterministic


def test_custom_classes_archive(tmp_path):
    labels = generate_archive(tmp_path, n=30, formats="png", classes="alpha,beta,gamma,normal", seed=1, size=96)
    assert set(labels["label"]) == {"alpha", "beta", "gamma", "normal"}
    for row in labels.itertuples():
        has_lesion = bool(np.asarray(Image.open(tmp_path / row.mask_path)).any())
        assert has_lesion == (row.label != "normal"), row


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown format 'gif'"):
        generate_archive(tmp_path / "x", n=5, formats="png,gif")
    with pytest.raises(UsageError, match="n must be"):
        generate_archive(tmp_path / "x", n=0)
    with pytest.raises(UsageError, match="duplicate"):
        generate_archive(tmp_path / "x", n=5, classes="a,a")
    with pytest.raises(UsageError, match="corrupt_fraction"):
        generate_archive(tmp_path / "x", n=5, corrupt_fraction=1.5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        generate_archive(tmp_path / "busy", n=5)
    with pytest.raises(UsageError, match="did not write"):
        generate_archive(tmp_path / "busy", n=5, overwrite=True)
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- CLI, storage, speed


def test_cli_prints_json_summary_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--n", "20", "--formats", "dcm,png", "--corrupt-fraction", "0.1", "--seed", "9", "--size", "96"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 20 and summary["corrupt"] == 2 and summary["images"] == 18
    assert sum(summary["by_class"].values()) == 18 and set(summary["by_format"]) == {"dicom", "png"}
    assert summary["out_dir"] == str(out) and Path(summary["labels"]).is_file()
    before = {rel: (out / rel).read_bytes() for rel in _files_under(out)}

    assert cli.main(argv) == 2
    assert json.loads(capsys.readouterr().err)["error"] == "usage"
    assert cli.main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert {rel: (out / rel).read_bytes() for rel in _files_under(out)} == before


def test_labels_csv_is_a_manifest_for_expand_inputs(archive):
    from cxr_ray.io.storage import expand_inputs

    out, labels = archive
    assert list(expand_inputs(str(out / "labels.csv"))) == [str(out / p) for p in labels["path"]]


def test_archive_written_to_s3(s3_bucket):
    import boto3

    from cxr_ray.io.storage import expand_inputs, read_bytes

    endpoint, bucket = s3_bucket
    labels = generate_archive(f"s3://{bucket}/phantom", n=10, corrupt_fraction=0.2, seed=1, size=64, s3_endpoint=endpoint)
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        .list_objects_v2(Bucket=bucket, Prefix="phantom/")["Contents"]
    }
    assert {f"phantom/{p}" for p in labels["path"]} <= keys and "phantom/labels.csv" in keys
    uris = list(expand_inputs(f"s3://{bucket}/phantom/labels.csv", s3_endpoint=endpoint))
    assert uris == [f"s3://{bucket}/phantom/{p}" for p in labels["path"]]
    assert read_bytes(uris[0], s3_endpoint=endpoint)
    with pytest.raises(UsageError, match="not empty"):
        generate_archive(f"s3://{bucket}/phantom", n=4, s3_endpoint=endpoint)
