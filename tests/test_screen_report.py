"""``OUTPUT/_report.html`` from real screening runs of phantom archives on the session's Ray
cluster: its counts are the Parquet's, flagged rows show pseudonymous ids and heatmap thumbnails,
the drift check warns on a shifted input mix and not on an unshifted one, a report failure never
fails the run, and a real headless Chromium renders it."""

from __future__ import annotations

import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from _screen_testing import make_archive, make_artifact, read_rows, screen_config
from PIL import Image

from cxr_ray.models.artifact import load_card, write_card
from cxr_ray.models.fingerprint import build_fingerprint
from cxr_ray.screen.job import run_screen
from cxr_ray.screen.report.render import CHARTS_DIR, REPORT_FILE, TOP_N
from cxr_ray.synth import generate_archive

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class ReportParser(HTMLParser):
    """The report's structure: section ids, tagged table rows (with their cells), image sources."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.rows: list[tuple[dict, list[str]]] = []
        self.images: list[dict] = []
        self.scores: list[float] = []  # of the top flagged inputs, in report order
        self.classes: list[str] = []
        self.ids: dict[str, str] = {}
        self._row: tuple[dict, list[str]] | None = None
        self._id: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.classes += (attrs.get("class") or "").split()
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "tr":
            self._row = (attrs, [])
            self.rows.append(self._row)
        elif tag == "figure" and "flagged-row" in (attrs.get("class") or ""):
            self.scores.append(float(attrs["data-score"]))
        elif tag == "img":
            self.images.append(attrs)
        self._id = attrs.get("id")

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row[1].append(data.strip())
        if self._id:
            self.ids[self._id] = self.ids.get(self._id, "") + data

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        self._id = None


def parse(output: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed((output / REPORT_FILE).read_text())
    return parser


def tagged(parser: ReportParser, attribute: str) -> dict[str, int]:
    return {a[attribute]: int(cells[-1]) for a, cells in parser.rows if attribute in a}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-archive")
    return root, make_archive(root, n=48, corrupt_fraction=0.15, seed=11, size=64)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("report-model") / "model", name="report-test", onnx=False)


@pytest.fixture(scope="module")
def screened(ray_cluster, archive, artifact, tmp_path_factory):
    root, _ = archive
    out = tmp_path_factory.mktemp("report-out") / "out"
    summary = run_screen(screen_config(artifact, [str(root / "labels.csv")], out, backend="torch",
                                       heatmaps="flagged"))
    assert summary["complete"]
    return out, summary


def test_the_report_counts_what_the_parquet_holds(screened, archive):
    out, summary = screened
    rows = read_rows(out)
    report = parse(out)
    assert report.sections == ["status", "scores", "flagged", "throughput", "drift"]
    assert int(report.ids["rows"]) == len(rows) == summary["rows"]
    assert tagged(report, "data-status") == {s: int((rows["status"] == s).sum()) for s in ("error", "ok", "skipped")}
    assert tagged(report, "data-code") == rows["error_code"].dropna().value_counts().to_dict()
    assert int(report.ids["flagged-count"]) == int(rows["flagged"].fillna(False).sum()) == summary["flagged"] > 0
    # the top flagged rows, highest score first, each with its heatmap as an inline thumbnail
    flagged = rows[rows["flagged"].fillna(False).astype(bool)]
    scores = report.scores
    assert len(scores) == min(TOP_N, len(flagged))
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(flagged["score"].max(), abs=1e-4)
    thumbnails = [i for i in report.images if i.get("class") == "thumb"]
    assert len(thumbnails) == len(scores) and flagged["heatmap_path"].notna().all()
    # self-contained: every image inline; the charts also as PNGs beside it
    assert all(i["src"].startswith("data:image/png;base64,") for i in report.images)
    assert summary["report"]["charts"] == [f"{CHARTS_DIR}/{n}.png" for n in ("counts", "scores", "throughput")]
    for chart in summary["report"]["charts"]:
        with Image.open(out / chart) as image:
            assert image.format == "PNG" and image.width > 300
    # pseudonymous: no input's path or file name anywhere in the report
    html = (out / REPORT_FILE).read_text()
    assert not [p for p in archive[1]["path"] if p.rsplit("/", 1)[-1] in html]
    # an artifact without a fingerprint: the drift check says it was not possible
    assert "drift-unavailable" in report.ids and "no training-data fingerprint" in report.ids["drift-unavailable"]
    assert summary["report"]["drift"]["available"] is False


def _fingerprinted_artifact(artifact: str, reference: Path, directory: Path) -> str:
    """A copy of ``artifact`` whose model.json holds the fingerprint of the ``ok`` rows screened
    into ``reference`` (the same functions training calls on its validation split)."""
    ok = read_rows(reference).query("status == 'ok'")
    copy = directory / "fingerprinted"
    shutil.copytree(artifact, copy)
    card = load_card(str(copy))
    card.drift_fingerprint = build_fingerprint(ok["score"].to_numpy(), ok.to_dict("records"),
                                               positive_class=card.positive_class)
    write_card(copy, card)
    return str(copy)


def test_drift_warns_on_a_shifted_input_mix_and_not_on_an_unshifted_one(screened, artifact, ray_cluster,
                                                                        tmp_path):
    reference, _ = screened
    model = _fingerprinted_artifact(artifact, reference, tmp_path)
    same_mix = make_archive(tmp_path / "same", n=48, corrupt_fraction=0.15, seed=12, size=64)  # another sample
    generate_archive(str(tmp_path / "png"), n=40, formats=("png",), seed=13, size=64)  # PNGs only
    assert len(same_mix)

    unshifted = run_screen(screen_config(model, [str(tmp_path / "same" / "labels.csv")], tmp_path / "out-same",
                                         backend="torch"))
    page = parse(tmp_path / "out-same")
    assert unshifted["report"]["drift"]["available"] and unshifted["report"]["drift"]["warnings"] == 0
    assert "drift-ok" in page.ids and "drift-warning" not in page.classes
    assert {a["data-level"] for a, _ in page.rows if "data-level" in a} <= {"stable", "moderate"}

    shifted = run_screen(screen_config(model, [str(tmp_path / "png" / "labels.csv")], tmp_path / "out-png",
                                       backend="torch"))
    page = parse(tmp_path / "out-png")
    levels = {a["data-name"]: a["data-level"] for a, _ in page.rows if "data-level" in a}
    assert levels["format"] == "significant", levels  # PNGs only, against a dicom/png/jpeg validation mix
    assert shifted["report"]["drift"]["warnings"] >= 1 and shifted["report"]["drift"]["psi"]["format"] > 0.2
    warnings = [t for t in page.text if "Significant shift in file format" in t]
    assert warnings and "validated on" in warnings[0]


def test_a_report_failure_never_fails_the_run(screened, archive, artifact, ray_cluster, tmp_path, caplog):
    source, _ = screened
    out = tmp_path / "out"
    shutil.copytree(source, out)
    (out / REPORT_FILE).unlink()
    (out / REPORT_FILE).mkdir()  # the report cannot be written there
    rows_before = len(read_rows(out))
    with caplog.at_level(logging.WARNING, logger="cxr_ray.screen.report"):
        summary = run_screen(screen_config(artifact, [str(archive[0] / "labels.csv")], out, backend="torch"))
    assert summary["complete"] and (out / "_SUCCESS").exists() and len(read_rows(out)) == rows_before
    assert "error" in summary["report"]
    lines = [r.getMessage() for r in caplog.records if r.name == "cxr_ray.screen.report"]
    assert len(lines) == 1 and "screening report not written" in lines[0] and "\n" not in lines[0]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`); not on PATH here")
def test_chromium_renders_the_report(screened, tmp_path):
    out, _ = screened
    shot = tmp_path / "report.png"
    # --no-sandbox: Chromium refuses to start its sandbox as root (CI containers); the page has no script.
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,1600", (out / REPORT_FILE).as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1000, 1600)
        pixels = np.asarray(image.convert("RGB"))
    not_white = (pixels < 240).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert not_white > 0.05 and colours > 100, (not_white, colours)  # text, tables, charts: not a blank page
