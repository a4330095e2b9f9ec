"""The cxr_ray_* series on a real scrape of Ray's Prometheus endpoint, after real work
(a request to a real Serve app, a small screening run; scraping in ``_prometheus``).

Counters are cumulative over the session (other tests may screen or serve too), so the
checks are lower bounds from what each test did, filtered by its app where Serve tags it.
"""

from __future__ import annotations

import httpx
import pytest
from _prometheus import Samples, metrics_url, total, wait_for_scrape
from _screen_testing import make_archive, read_rows, screen_config
from _screen_testing import make_artifact as make_screen_artifact
from _serve_testing import deploy, make_artifact

from cxr_ray.serve.config import DeploymentArgs, ServeArgs

APP = "test-prometheus"


# ------------------------------------------------------------------ serve


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    args = ServeArgs(
        model=str(make_artifact(tmp_path_factory.mktemp("prom-model"))),
        ingress=DeploymentArgs(num_replicas=1, ray_actor_options={"num_cpus": 0}),
    )
    url = deploy(args, name=APP, route_prefix="/prom")
    yield url
    serve.delete(APP)


def test_serve_series_on_the_scrape(ray_cluster, server, real_data_dir):
    png = (real_data_dir / "00000001_000.png").read_bytes()
    with httpx.Client(base_url=server, timeout=120) as client:
        ok = client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
        assert ok.status_code == 200, ok.text
        refused = client.post("/v1/predict", content=b"text", headers={"Content-Type": "text/plain"})
        assert refused.status_code == 415, refused.text
    mine = {"application": APP}

    def ready(s: Samples) -> bool:
        return (
            total(s, "ray_cxr_ray_serve_requests_total", route="/prom/v1/predict", status="200", error_code="ok",
                  **mine) >= 1
            and total(s, "ray_cxr_ray_serve_requests_total", status="415", error_code="unsupported_media_type",
                      **mine) >= 1
            and total(s, "ray_cxr_ray_serve_model_ms_count", **mine) >= 1
            and total(s, "ray_cxr_ray_serve_batch_size_count", **mine) >= 1
        )

    samples = wait_for_scrape(metrics_url(ray_cluster), ready)
    assert total(samples, "ray_cxr_ray_serve_request_latency_ms_count", **mine) >= 2
    assert total(samples, "ray_cxr_ray_serve_decode_ms_count", **mine) >= 1  # the 415 never reached decoding
    # One request, one image: the batch-size histogram puts it in the first bucket.
    assert total(samples, "ray_cxr_ray_serve_batch_size_bucket", le="1.0", **mine) >= 1
    assert any(tags.get("queue") == "batcher" and tags.get("application") == APP
               for tags, _ in samples["ray_cxr_ray_serve_queue_depth"])
    # Tags stay low-cardinality: no request id, path or client in any cxr_ray series.
    names = {k for name, series in samples.items() if "cxr_ray_serve" in name for tags, _ in series for k in tags}
    assert not names & {"request_id", "path", "client", "file", "filename"}, names


# ------------------------------------------------------------------ screening


def test_screening_series_on_the_scrape(ray_cluster, tmp_path):
    from cxr_ray.screen.job import run_screen

    archive = tmp_path / "archive"
    labels = make_archive(archive, n=12, corrupt_fraction=0.25, seed=11)
    artifact = make_screen_artifact(tmp_path / "model")
    url = metrics_url(ray_cluster)
    run_screen(screen_config(artifact, [str(archive / "labels.csv")], tmp_path / "out"))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == len(labels)
    by_status = rows["status"].value_counts().to_dict()
    by_code = rows.fillna({"error_code": "none"}).groupby(["status", "error_code"]).size().to_dict()
    flagged = int(rows["flagged"].fillna(False).astype(bool).sum())
    assert by_status.get("ok", 0) > 0 and sum(by_status.values()) > by_status["ok"]  # both kinds, so tags differ

    # Counters add up over the session's other screening runs, and Ray drops a dead worker's series
    # 120 s after its last report, so neither totals nor growth pin this run: the checks are lower
    # bounds, and ready also waits for every (status, error code) pair this run wrote, which an
    # earlier run's counts alone need not show (lateral_view once passed before it was exported).
    def ready(s: Samples) -> bool:
        return (
            all(total(s, "ray_cxr_ray_screen_rows_total", status=st, error_code=code) >= n
                for (st, code), n in by_code.items())
            # decode and predict run in the Predictor actors here (a CPU-only cluster), write in tasks
            and all(total(s, "ray_cxr_ray_screen_stage_seconds_count", stage=st) >= 1
                    for st in ("decode", "predict", "write"))
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="decode") >= len(rows)
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="predict") >= by_status["ok"]
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="write") >= len(rows)
            and total(s, "ray_cxr_ray_screen_flagged_total") >= flagged
        )

    samples = wait_for_scrape(url, ready)
    assert total(samples, "ray_cxr_ray_screen_rows_total", status="ok", error_code="none") >= by_status["ok"]
    codes = {tags["error_code"] for tags, _ in samples["ray_cxr_ray_screen_rows_total"]}
    assert codes >= set(rows["error_code"].dropna()), codes  # error codes as tags, never paths
    assert not any("/" in c for c in codes)
