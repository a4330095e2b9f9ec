"""Labelled data: listing (manifest / folder tree), decoding to tensors, patient-level splits,
k-fold, duplicate removal, class weights, fingerprint and augmentation. Real files from the
phantom generator, real decode; Ray only where the Ray Data pipeline itself is under test."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_ray.data.augment import AugmentConfig, RadiographAugment, mixing
from cxr_ray.data.labelled import decode_batch, read_labelled
from cxr_ray.data.splits import (
    FILE_PREFIX,
    check_disjoint,
    class_weights,
    data_fingerprint,
    deduplicate,
    kfold_assign,
    patient_groups,
    train_val_test_split,
)
from cxr_ray.errors import UsageError
from cxr_ray.io.decode import decode_image
from cxr_ray.preprocess import PreprocessConfig, preprocess, standardise
from cxr_ray.synth import generate_archive

PREPROCESSING = PreprocessConfig(image_size=32).to_dict()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """40 phantom images (PNG, DICOM) + 4 corrupt files, every row labelled."""
    root = tmp_path_factory.mktemp("archive")
    labels = generate_archive(str(root), n=44, formats=("png", "dcm"), corrupt_fraction=0.1, seed=5, size=64)
    labels["label"] = labels["label"].fillna("normal")  # corrupt files get a label too: decode must drop them
    labels.to_csv(root / "labels.csv", index=False)
    return root, labels


# --------------------------------------------------------------------------- listing


def test_manifest_paths_resolve_against_the_manifest(archive, tmp_path, monkeypatch):
    root, labels = archive
    monkeypatch.chdir(tmp_path)  # relative entries must not depend on the working directory
    source = read_labelled(str(root / "labels.csv"))
    assert source.layout == "manifest"
    assert source.classes == sorted(labels["label"].unique())
    assert len(source.frame) == len(labels)
    assert all(os.path.isabs(p) and os.path.exists(p) for p in source.frame["path"])
    assert list(source.frame["patient_id"]) == list(labels["patient_id"].astype(str))
    assert source.report["per_class"] == labels["label"].value_counts().to_dict()


def test_manifest_parquet_drops_unlabelled_rows_and_counts_them(archive, tmp_path):
    root, labels = archive
    table = labels[["path", "label"]].copy()
    table["path"] = [str(root / p) for p in table["path"]]  # absolute entries are taken as given
    table.loc[0, "label"] = None
    table.to_parquet(tmp_path / "m.parquet")
    source = read_labelled(str(tmp_path / "m.parquet"))
    assert len(source.frame) == len(labels) - 1
    assert source.report["rows_without_path_or_label"] == 1
    assert set(source.frame["patient_id"]) == {""}


def test_manifest_without_label_column_is_a_usage_error(tmp_path):
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(UsageError, match="label"):
        read_labelled(str(tmp_path / "m.csv"))


def test_folder_tree_classes_are_the_first_folder(archive, tmp_path):
    root, labels = archive
    tree = tmp_path / "tree"
    ok = labels[~labels["corrupt"].astype(bool)].head(9)
    for i, row in enumerate(ok.itertuples()):
        target = tree / row.label / ("deeper" if i % 2 else "") / os.path.basename(row.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / row.path, target)
    (tree / "README.txt").write_text("not in a class folder")
    source = read_labelled(str(tree))
    assert source.layout == "folders"
    assert sorted(source.frame["label"]) == sorted(ok["label"])
    assert source.report["files_outside_class_folders"] == 1
    assert groups_of(source.frame).str.startswith(FILE_PREFIX).all()  # no patient ids in a folder tree


def groups_of(frame: pd.DataFrame) -> pd.Series:
    return patient_groups(frame)[0]


def test_fixed_classes_drop_and_count_other_labels(archive):
    root, labels = archive
    source = read_labelled(str(root / "labels.csv"), classes=["covid", "normal"])
    assert set(source.frame["label"]) <= {"covid", "normal"}
    assert source.report["unknown_label"] == int((labels["label"] == "pneumonia").sum())


# --------------------------------------------------------------------------- decoding


def test_decode_batch_preprocesses_like_serving_and_reports_bad_files(archive):
    root, labels = archive
    batch = {
        "row_id": np.arange(len(labels)),
        "path": np.array([str(root / p) for p in labels["path"]], dtype=object),
        "label": np.zeros(len(labels), dtype=np.int64),
    }
    out = decode_batch(batch, preprocessing=PREPROCESSING)
    assert out["image"].shape == (len(labels), 1, 32, 32) and out["image"].dtype == np.float32
    corrupt = labels["corrupt"].astype(bool).to_numpy()
    assert (out["status"][corrupt] == "error").all() and (out["status"][~corrupt] == "ok").all()
    expected = labels.loc[corrupt, "expected_error"].tolist()
    assert out["error_code"][corrupt].tolist() == expected
    for i in np.flatnonzero(~corrupt)[:5]:  # bit-identical to what screening / serving compute
        data = (root / labels["path"][i]).read_bytes()
        assert out["sha256"][i] == hashlib.sha256(data).hexdigest()
        reference = preprocess(decode_image(data, "x", target_size=32).pixels, PreprocessConfig(32))
        # the cache holds the unit image; the one standardise turns it into the model input
        np.testing.assert_array_equal(standardise(out["image"][i], PreprocessConfig(32)), reference)


def test_missing_file_is_read_failed_not_an_exception(tmp_path):
    out = decode_batch({"row_id": np.array([0]), "path": np.array([str(tmp_path / "gone.png")], dtype=object),
                        "label": np.array([0])}, preprocessing=PREPROCESSING)
    assert out["status"][0] == "error" and out["error_code"][0] == "read_failed"


# --------------------------------------------------------------------------- splits


def _table(n_patients: int = 30, per_patient: int = 3, classes: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = p % classes
        for j in range(int(rng.integers(1, per_patient + 1))):
            rows.append({"path": f"/d/p{p}_{j}.png", "label": label, "patient_id": f"P{p}",
                         "sha256": hashlib.sha256(f"{p}-{j}".encode()).hexdigest()})
    frame = pd.DataFrame(rows)
    frame["group"] = groups_of(frame)
    return frame


def test_files_without_patient_id_are_their_own_group_and_the_report_says_so():
    frame = pd.DataFrame({"path": ["a", "b", "c"], "patient_id": ["P1", "", None]})
    groups, report = patient_groups(frame)
    assert groups.tolist() == ["patient:P1", "file:b", "file:c"]
    assert report["files_without_patient_id"] == 2 and "own group" in report["note"]


def test_dicom_patient_pseudonym_groups_files_without_a_manifest_id():
    frame = pd.DataFrame({"path": ["a", "b", "c"], "patient_id": ["", "", ""],
                          "patient_pseudonym": ["h1", "h1", ""]})
    groups, report = patient_groups(frame)
    assert groups[0] == groups[1] != groups[2]
    assert report["files_with_dicom_patient_pseudonym"] == 2


def test_train_val_test_split_is_patient_level_stratified_and_reproducible():
    frame = _table(60)
    split = train_val_test_split(frame, val_fraction=0.15, test_fraction=0.2, seed=3)
    frame["split"] = split
    check_disjoint(frame, "split")  # no patient (or image) in two splits
    assert set(split) == {"train", "val", "test"}
    for part in ("val", "test"):  # every class in every evaluation split
        assert set(frame.loc[frame["split"] == part, "label"]) == {0, 1, 2}
    assert 0.1 < (split == "test").mean() < 0.3
    assert split.equals(train_val_test_split(frame, val_fraction=0.15, test_fraction=0.2, seed=3))


def test_kfold_puts_no_patient_in_two_folds():
    frame = _table(40)
    frame["fold"] = kfold_assign(frame, 5, seed=1)
    assert sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]
    assert frame.groupby("group")["fold"].nunique().max() == 1
    check_disjoint(frame, "fold")
    sizes = frame.groupby("fold")["group"].nunique()
    assert sizes.min() >= 6  # 40 patients over 5 folds, roughly even


def test_kfold_needs_enough_patients():
    with pytest.raises(UsageError, match="patient groups"):
        kfold_assign(_table(3), 5)


def test_check_disjoint_catches_a_leak():
    frame = _table(6)
    frame["split"] = "train"
    frame.loc[frame.index[0], "split"] = "test"  # patient P0 now on both sides
    with pytest.raises(AssertionError, match="group"):
        check_disjoint(frame, "split")


# --------------------------------------------------------------------------- duplicates


def test_duplicates_across_splits_are_detected_and_one_copy_kept_in_train():
    frame = _table(20)
    frame["split"] = np.where(frame["label"] == 0, "train", "test")
    train_row = frame[frame["split"] == "train"].iloc[0]
    # the same bytes under another patient id, in the test split (same label) ...
    leak = frame[(frame["split"] == "test")].index[0]
    frame.loc[leak, ["sha256", "label"]] = [train_row["sha256"], train_row["label"]]
    # ... and a pair that disagrees about its label, inside one split
    a, b = frame[frame["split"] == "test"].index[1:3]
    frame.loc[b, "sha256"] = frame.loc[a, "sha256"]
    frame.loc[b, "label"] = (frame.loc[a, "label"] + 1) % 3
    kept, report = deduplicate(frame, "split", ["train", "val", "test"])
    assert report["duplicate_sets"] == 2
    assert report["across_splits"] == 1 and report["within_split"] == 1
    assert report["conflicting_labels"] == 1
    assert report["files_removed"] == 3  # the test copy of the leak + both conflicting copies
    assert leak not in kept.index and train_row.name in kept.index
    assert not kept["sha256"].duplicated().any()
    check_disjoint(kept.assign(group=range(len(kept))), "split")
    crossing = next(e for e in report["examples"] if not e["labels_conflict"])
    assert crossing["splits"] == ["train", "test"] and crossing["kept"] == os.path.basename(train_row["path"])


# --------------------------------------------------------------------------- weights, fingerprint


def test_class_weights_are_balanced_and_zero_for_absent_classes():
    weights = class_weights([0, 0, 0, 1], 3)
    assert weights == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_fingerprint_depends_on_content_and_label_not_order():
    a = data_fingerprint(["h1", "h2"], ["covid", "normal"])
    assert a == data_fingerprint(["h2", "h1"], ["normal", "covid"])
    assert a != data_fingerprint(["h1", "h2"], ["covid", "covid"])
    assert len(a) == 64


# --------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_shape_and_varies_per_image():
    torch.manual_seed(0)
    unit = torch.rand(1, 1, 32, 32).repeat(4, 1, 1, 1)
    out = RadiographAugment(AugmentConfig())(unit)
    assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])  # each image draws its own parameters
    assert out.min() >= 0 and out.max() <= 1  # still a [0, 1] film
    assert torch.equal(unit[0], unit[1])  # the input is left alone


def test_no_horizontal_flip_by_default():
    unit = torch.zeros(64, 1, 32, 32)
    unit[..., :, 20:28] = 1.0  # a bright structure on the image's right (the heart side)
    torch.manual_seed(1)
    out = RadiographAugment(AugmentConfig())(unit)
    right, left = out[..., 16:].sum(dim=(1, 2, 3)), out[..., :16].sum(dim=(1, 2, 3))
    assert bool((right > 4 * left).all())
    flipped = RadiographAugment(AugmentConfig(hflip=True))(unit)
    assert bool((flipped[..., :16].sum(dim=(1, 2, 3)) > flipped[..., 16:].sum(dim=(1, 2, 3))).any())


def test_disabled_augmentation_is_the_identity():
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(RadiographAugment(AugmentConfig(enabled=False))(x), x)
    still = AugmentConfig(crop_scale=(1.0, 1.0), rotation=0.0, translate=0.0, brightness=0.0, contrast=0.0)
    assert torch.equal(RadiographAugment(still)(x), x)


def test_crop_keeps_the_film_and_zoom_out_adds_a_black_border():
    unit = torch.ones(32, 1, 48, 48)
    inside = AugmentConfig(crop_scale=(0.5, 0.7), crop_ratio=(0.8, 1.25), rotation=0.0, translate=0.0,
                           brightness=0.0, contrast=0.0)
    torch.manual_seed(2)
    assert torch.allclose(RadiographAugment(inside)(unit), unit)  # a crop inside a uniform film is that film
    wider = AugmentConfig(crop_scale=(1.3, 1.4), rotation=0.0, translate=0.0, brightness=0.0, contrast=0.0)
    border = RadiographAugment(wider)(unit)
    film_share = border.mean(dim=(1, 2, 3))  # the film covers 1 / area of a zoomed-out view
    assert bool(((film_share > 1 / 1.4 - 0.03) & (film_share < 1 / 1.3 + 0.03)).all()), film_share


def test_gamma_and_contrast_change_exposure_not_geometry():
    torch.manual_seed(3)
    ramp = torch.linspace(0.05, 0.95, 40).repeat(40, 1)[None, None].repeat(8, 1, 1, 1)
    config = AugmentConfig(crop_scale=(1.0, 1.0), rotation=0.0, translate=0.0, brightness=0.0, contrast=0.3,
                           gamma=0.4)
    out = RadiographAugment(config)(ramp)
    assert not torch.allclose(out, ramp)
    # monotone along the ramp: intensity maps never reorder pixels
    assert bool((out[..., 1:] >= out[..., :-1] - 1e-6).all())


def test_mixing_gives_soft_targets_that_sum_to_one():
    torch.manual_seed(4)
    mix = mixing(3, mixup=0.2, cutmix=1.0)
    images, targets = mix(torch.rand(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert targets.shape == (8, 3) and torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert mixing(3, 0.0, 0.0) is None


def test_standardise_is_one_rule_for_numpy_and_torch():
    unit = np.random.default_rng(0).random((3, 1, 20, 20), dtype=np.float32)
    for normalization in ("fixed", "per_image"):
        config = PreprocessConfig(20, normalization=normalization)
        from_numpy = standardise(unit, config)
        from_torch = standardise(torch.from_numpy(unit), config).numpy()
        np.testing.assert_allclose(from_numpy, from_torch, atol=1e-6)
        np.testing.assert_allclose(preprocess(unit[1, 0], config), from_numpy[1], atol=1e-6)
    per_image = standardise(unit, PreprocessConfig(20, normalization="per_image"))
    np.testing.assert_allclose(per_image.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(per_image.std(axis=(2, 3)), 1, atol=1e-4)
    blank = standardise(np.full((1, 8, 8), 0.5, np.float32), PreprocessConfig(8, normalization="per_image"))
    assert np.isfinite(blank).all() and np.allclose(blank, 0)


# --------------------------------------------------------------------------- the Ray Data pipeline


def test_decode_dataset_caches_tensors_and_subsets_keep_their_type(archive, ray_cluster):
    from cxr_ray.train.ingest import decode_dataset, subset

    root, labels = archive
    frame = pd.DataFrame({"row_id": np.arange(len(labels)), "path": [str(root / p) for p in labels["path"]],
                          "label": np.zeros(len(labels), dtype=np.int64)})
    decoded, meta = decode_dataset(frame, PREPROCESSING, rows_per_block=8)
    assert meta["row_id"].tolist() == list(range(len(labels)))
    assert int((meta["status"] == "error").sum()) == int(labels["corrupt"].astype(bool).sum())
    ids = meta.loc[meta["status"] == "ok", "row_id"].to_numpy()[:3]  # most blocks end up empty
    part = subset(decoded, ids)
    rows = part.take_all()
    assert sorted(r["row_id"] for r in rows) == sorted(ids.tolist())
    assert all(np.asarray(r["image"]).shape == (1, 32, 32) for r in rows)
    assert "Tensor" in str(part.schema().types[part.schema().names.index("image")])


# --------------------------------------------------------------------------- s3


def test_s3_manifest_and_folder_tree_resolve_and_decode(archive, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    root, labels = archive
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    rows = labels[~labels["corrupt"].astype(bool)].groupby("label").head(2)
    for row in rows.itertuples():
        data = (root / row.path).read_bytes()
        client.put_object(Bucket=bucket, Key=f"set/{row.path}", Body=data)  # manifest layout
        client.put_object(Bucket=bucket, Key=f"tree/{row.label}/{os.path.basename(row.path)}", Body=data)
    client.put_object(Bucket=bucket, Key="set/labels.csv", Body=rows[["path", "label", "patient_id"]].to_csv(index=False).encode())

    source = read_labelled(f"s3://{bucket}/set/labels.csv", s3_endpoint=endpoint)
    assert source.frame["path"].tolist() == [f"s3://{bucket}/set/{p}" for p in rows["path"]]
    out = decode_batch({"row_id": np.arange(len(rows)), "path": source.frame["path"].to_numpy(),
                        "label": np.zeros(len(rows), dtype=np.int64)}, preprocessing=PREPROCESSING, s3_endpoint=endpoint)
    assert (out["status"] == "ok").all()

    tree = read_labelled(f"s3://{bucket}/tree", s3_endpoint=endpoint)
    assert sorted(tree.frame["label"]) == sorted(rows["label"])
    assert all(p.startswith(f"s3://{bucket}/tree/") for p in tree.frame["path"])
