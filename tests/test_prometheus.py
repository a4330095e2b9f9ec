"""The cxr_ray_* series on a real scrape of Ray's Prometheus endpoint, after real work.

The session's local Ray runs a metrics agent on its node, which serves every worker's
``ray.util.metrics`` / ``ray.serve.metrics`` series at ``http://<node>:<MetricsExportPort>/metrics``
(the port is random unless ``--metrics-export-port`` / ``_metrics_export_port`` sets it;
``ray.nodes()`` says which). Workers report to the agent every few seconds, so each check
polls the scrape with a bounded wait. Counters are cumulative over the session (other
tests may screen or serve too), so the checks are lower bounds from what this test did.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import httpx
import pytest
from _screen_testing import make_archive, read_rows, screen_config
from _screen_testing import make_artifact as make_screen_artifact
from _serve_testing import deploy, make_artifact
from prometheus_client.parser import text_string_to_metric_families

from cxr_ray.serve.config import DeploymentArgs, ServeArgs

SCRAPE_WAIT_S = 120  # generous: the agent's export interval is seconds, and this machine's CPUs are shared
APP = "test-prometheus"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _metrics_url(ray) -> str:
    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> Samples:
    """Every sample of the scrape, by sample name (``..._total``, ``..._bucket``, ``..._count``...)."""
    text = httpx.get(url, timeout=10).text
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), sample.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for tags, v in samples.get(name, []) if all(tags.get(k) == want for k, want in labels.items()))


def wait_for_scrape(url: str, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ready`` holds (returns that scrape) or SCRAPE_WAIT_S passes (fails with the cxr series seen)."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        samples = scrape(url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            seen = {name: tags for name, tags in samples.items() if "cxr_ray" in name}
            pytest.fail(f"series not on the scrape after {SCRAPE_WAIT_S}s; cxr_ray samples seen: {seen}")
        time.sleep(1.0)


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

    samples = wait_for_scrape(_metrics_url(ray_cluster), ready)
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
    run_screen(screen_config(artifact, [str(archive / "labels.csv")], tmp_path / "out"))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == len(labels)
    by_status = rows["status"].value_counts().to_dict()
    flagged = int(rows["flagged"].fillna(False).astype(bool).sum())
    assert by_status.get("ok", 0) > 0 and sum(by_status.values()) > by_status["ok"]  # both kinds, so tags differ

    def ready(s: Samples) -> bool:
        return (
            all(total(s, "ray_cxr_ray_screen_rows_total", status=st) >= n for st, n in by_status.items())
            # decode and predict run in the Predictor actors here (a CPU-only cluster), write in tasks
            and all(total(s, "ray_cxr_ray_screen_stage_seconds_count", stage=st) >= 1
                    for st in ("decode", "predict", "write"))
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="decode") >= len(rows)
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="predict") >= by_status["ok"]
            and total(s, "ray_cxr_ray_screen_stage_rows_total", stage="write") >= len(rows)
        )

    samples = wait_for_scrape(_metrics_url(ray_cluster), ready)
    assert total(samples, "ray_cxr_ray_screen_rows_total", status="ok", error_code="none") >= by_status["ok"]
    if flagged:
        assert total(samples, "ray_cxr_ray_screen_flagged_total") >= flagged
    codes = {tags["error_code"] for tags, _ in samples["ray_cxr_ray_screen_rows_total"]}
    assert codes >= set(rows["error_code"].dropna()), codes  # error codes as tags, never paths
    assert not any("/" in c for c in codes)
