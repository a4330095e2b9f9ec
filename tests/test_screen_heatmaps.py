"""``--heatmaps flagged`` end to end on the session's Ray cluster: an overlay exactly for each
flagged ``ok`` row, at the original image size, named by a digest of the path, its URI in the
row's ``heatmap_path``; unsupported (architecture, method) pairs refused before any work."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from _screen_testing import CLASSES, make_archive, make_artifact, read_rows
from PIL import Image

from cxr_ray.errors import DecodeError
from cxr_ray.explain import Explainer, UnsupportedExplanationError
from cxr_ray.io.decode import decode_image
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import new_card
from cxr_ray.preprocess import preprocess
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.heatmaps import HeatmapWriter, heatmap_name
from cxr_ray.screen.inputs import path_digests
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.schema import HEATMAP_PATH, output_schema

ARCH, MODEL_SIZE, PHANTOM_SIZE = "resnet18", 64, 96  # model input != stored size: overlays must be 96 px high


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap-archive")
    return root, make_archive(root, n=16, corrupt_fraction=0.2, seed=7, size=PHANTOM_SIZE)


@pytest.fixture(scope="module")
def artifact(archive, tmp_path_factory):
    """A random-weight resnet18 at 64 px whose threshold is the median covid score of the
    archive's decodable images: about half the ``ok`` rows are flagged, the rest are not."""
    _, labels = archive
    torch.manual_seed(0)
    model = build_model(ARCH, len(CLASSES)).eval()
    card = new_card(name="heatmap-test", arch=ARCH, classes=CLASSES, image_size=MODEL_SIZE, positive_class="covid")
    batch = []
    for uri in labels["uri"]:
        try:
            with open(uri, "rb") as handle:
                pixels = decode_image(handle.read(), "x", target_size=MODEL_SIZE).pixels
        except DecodeError:
            continue
        batch.append(preprocess(pixels, card.preprocess_config))
    with torch.no_grad():
        scores = torch.softmax(model(torch.from_numpy(np.stack(batch))), dim=1)[:, 0].numpy()
    card.thresholds = {"positive": float(np.median(scores)), "chosen_on": "validation"}
    directory = tmp_path_factory.mktemp("heatmap-model") / "model"
    save_artifact(directory, model, card)
    return str(directory)


def _config(artifact, inputs, output, **overrides) -> ScreenConfig:
    base = dict(
        model=artifact, inputs=inputs, output=str(output), backend="torch", batch_size=8, decode_batch_size=4,
        rows_per_part=10, actors=(1, 1), progress_every_s=0, heatmaps="flagged",
    )
    base.update(overrides)
    return ScreenConfig(**base)


@pytest.fixture(scope="module")
def screened(ray_cluster, archive, artifact, tmp_path_factory):
    root, _ = archive
    out = tmp_path_factory.mktemp("heatmap-out") / "run"
    summary = run_screen(_config(artifact, [str(root / "labels.csv")], out))
    return out, summary


def test_an_overlay_exactly_for_each_flagged_ok_row(archive, screened):
    _, labels = archive
    out, summary = screened
    rows = read_rows(out)
    assert summary["complete"] and len(rows) == len(labels)
    assert HEATMAP_PATH in rows.columns
    wanted = (rows["status"] == "ok") & (rows["flagged"].fillna(False).astype(bool))
    assert 0 < wanted.sum() < (rows["status"] == "ok").sum()  # some flagged, some not
    assert rows.loc[wanted, HEATMAP_PATH].notna().all()
    assert rows.loc[~wanted, HEATMAP_PATH].isna().all()  # not flagged, errors, skipped: null
    assert not any("heatmap" in w for ws in rows["warnings"] for w in ws)

    heatmaps = out / "_heatmaps"
    expected = set()
    for _, row in rows[wanted].iterrows():
        path = row[HEATMAP_PATH]
        stem = path_digests([row["path"]])[0].tobytes().hex() + ".gradcam"
        assert path == str(heatmaps / f"{stem}.png") and heatmap_name(row["path"], "gradcam") == stem
        assert os.path.splitext(os.path.basename(row["path"]))[0] not in path  # never the file name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (row["cols"], row["rows"])  # the original size, not the model's 64 px
        raw = np.load(heatmaps / f"{stem}.npy", allow_pickle=False)
        assert raw.dtype == np.float32 and raw.shape == (row["rows"], row["cols"])
        assert raw.min() >= 0.0 and raw.max() <= 1.0
        expected |= {f"{stem}.png", f"{stem}.npy"}
    assert {p.name for p in heatmaps.iterdir()} == expected  # nothing for any other row
    assert len(pd.read_parquet(out)) == len(rows)  # readers of OUTPUT as a dataset skip _heatmaps/


def test_the_overlay_is_the_explainer_output_for_the_positive_class(artifact, screened):
    from cxr_ray.explain import overlay_png_bytes
    from cxr_ray.models.artifact import load_model

    out, _ = screened
    row = read_rows(out).dropna(subset=[HEATMAP_PATH]).iloc[0]
    model, card = load_model(artifact)
    with open(row["path"], "rb") as handle:
        pixels = decode_image(handle.read(), "x").pixels
    explanation = Explainer(model, card, "gradcam").explain(pixels, "covid")
    stem = os.path.splitext(row[HEATMAP_PATH])[0]
    np.testing.assert_allclose(np.load(stem + ".npy"), explanation.heatmap, atol=1e-4)
    written = np.asarray(Image.open(row[HEATMAP_PATH]))
    direct = np.asarray(Image.open(io.BytesIO(overlay_png_bytes(pixels, explanation.heatmap))))
    assert np.abs(written.astype(int) - direct.astype(int)).max() <= 2


def test_a_row_that_cannot_be_explained_gets_a_warning_not_a_failed_batch(archive, artifact, tmp_path):
    _, labels = archive
    good = str(labels.loc[~labels["corrupt"].astype(bool), "uri"].iloc[0])
    schema = output_schema(CLASSES)
    fields = ["path", "status", "flagged", HEATMAP_PATH, "warnings"]
    table = pa.table(
        {
            "path": [str(tmp_path / "gone.png"), good, good + ".not-flagged"],
            "status": ["ok", "ok", "ok"],
            "flagged": [True, True, False],
            HEATMAP_PATH: pa.nulls(3, pa.string()),
            "warnings": [["no ViewPosition; assumed frontal"], [], []],
        },
        schema=pa.schema([schema.field(name) for name in fields]),
    )
    writer = HeatmapWriter(artifact, "gradcam", heatmaps=str(tmp_path / "heatmaps"), num_threads=1)
    result = writer(table)
    assert result.schema == table.schema
    paths, warnings = result.column(HEATMAP_PATH).to_pylist(), result.column("warnings").to_pylist()
    assert paths[0] is None and warnings[0] == ["no ViewPosition; assumed frontal",
                                                "heatmap not written (gradcam): FileNotFoundError"]
    assert paths[1] == str(tmp_path / "heatmaps" / (heatmap_name(good, "gradcam") + ".png")) and warnings[1] == []
    assert paths[2] is None and warnings[2] == []


def test_heatmaps_read_from_and_write_to_s3(archive, artifact, s3_bucket):
    import boto3

    from cxr_ray.screen.heatmaps import heatmaps_uri

    endpoint, bucket = s3_bucket
    _, labels = archive
    row = labels[~labels["corrupt"].astype(bool)].iloc[0]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with open(row["uri"], "rb") as handle:
        client.put_object(Bucket=bucket, Key="archive/one", Body=handle.read())
    source = f"s3://{bucket}/archive/one"
    table = pa.table({"path": [source], "status": ["ok"], "flagged": [True], HEATMAP_PATH: pa.nulls(1, pa.string()),
                      "warnings": pa.array([[]], pa.list_(pa.string()))})
    writer = HeatmapWriter(artifact, "gradcam", heatmaps=heatmaps_uri(f"s3://{bucket}/out"), s3_endpoint=endpoint)
    result = writer(table)
    stem = heatmap_name(source, "gradcam")
    assert result.column(HEATMAP_PATH).to_pylist() == [f"s3://{bucket}/out/_heatmaps/{stem}.png"]
    png = client.get_object(Bucket=bucket, Key=f"out/_heatmaps/{stem}.png")["Body"].read()
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size[1] == PHANTOM_SIZE
    raw = np.load(io.BytesIO(client.get_object(Bucket=bucket, Key=f"out/_heatmaps/{stem}.npy")["Body"].read()))
    assert raw.shape == (image.size[1], image.size[0])


def test_heatmap_actors_ask_for_a_cpu_only_where_one_is_left():
    from cxr_ray.screen.heatmaps import stage_arguments
    from cxr_ray.screen.resources import plan_layout

    config = ScreenConfig(model="m", inputs=["i"], output="o", heatmaps="flagged")
    for cpus, want in ((8.0, 0.25), (2.0, 0.25), (1.0, 0.25)):
        plan = plan_layout(config, {"CPU": cpus})
        args = stage_arguments(config, "o", plan, {"CPU": cpus})
        assert args["num_cpus"] == want, cpus
        assert args["fn_constructor_kwargs"]["heatmaps"] == os.path.join(os.path.abspath("o"), "_heatmaps")
    # A one-CPU machine whose predict actor (0.5) and decode task (0.25) leave no CPU for another actor.
    full = ScreenConfig(model="m", inputs=["i"], output="o", heatmaps="flagged", cpus_per_actor=0.5, decode_cpus=0.25)
    assert stage_arguments(full, "o", plan_layout(full, {"CPU": 1.0}), {"CPU": 1.0})["num_cpus"] == 0
    gpu = plan_layout(config, {"CPU": 16.0, "GPU": 2.0})
    assert stage_arguments(config, "s3://b/o", gpu, {"CPU": 16.0, "GPU": 2.0})["num_cpus"] == 1.0


def test_unsupported_pairs_are_refused_before_any_work(archive, tmp_path):
    from cxr_ray import cli

    root, _ = archive
    mobilenet = make_artifact(tmp_path / "mobilenet", onnx=False)  # Grad-CAM yes, LRP no
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExplanationError, match="lrp is not supported for architecture 'mobilenet_v2'"):
        run_screen(_config(mobilenet, [str(root / "labels.csv")], out, heatmap_method="lrp"))
    assert not out.exists()
    code = cli.main(["screen", "--model", mobilenet, "--input", str(root / "labels.csv"), "--output", str(out),
                     "--heatmaps", "flagged", "--heatmap-method", "lrp"])
    assert code == 2 and not out.exists()
    with pytest.raises(Exception, match="heatmaps must be one of none, flagged"):
        _config(mobilenet, [str(root / "labels.csv")], out, heatmaps="all")
