"""A guarded, deliberately tiny deployment: an API key (401) and admission limits
(503). One app for the module, on its own route prefix.

Overload is made deterministic with real settings, no sleeps in the server: the
predictor admits ONE request at a time (``max_ongoing_requests=1``) and holds it
for ``batch_wait_timeout_s=3`` waiting for a second batch member that can never
be admitted (``max_batch_size=2``); one more request may queue
(``max_queued_requests=1``); the next one must get 503 at once.
The 503s are then found on a real scrape of Ray's metrics endpoint.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from _prometheus import metrics_url, total, wait_for_scrape
from _serve_testing import deploy, make_artifact

from cxr_ray.serve.config import DeploymentArgs, ServeArgs

APP = "test-serve-guarded"
PREFIX = "/guarded"
KEY_ENV = "CXR_TEST_SERVE_API_KEY"
KEY = "k3y-for-tests-only"
HOLD_S = 3.0


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    artifact = make_artifact(tmp_path_factory.mktemp("guarded-model"))
    args = ServeArgs(
        model=str(artifact),
        api_key_env=KEY_ENV,
        max_batch_size=2,
        batch_wait_timeout_s=HOLD_S,
        ingress=DeploymentArgs(
            num_replicas=1, max_ongoing_requests=32, max_queued_requests=64,
            # Where a cluster gets the key from its nodes' environment (a Kubernetes
            # Secret), this test cluster gets it from the replica's runtime env.
            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {KEY_ENV: KEY}}},
        ),
        predictor=DeploymentArgs(num_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
                                 ray_actor_options={"num_cpus": 0}),
    )
    url = deploy(args, name=APP, route_prefix=PREFIX)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def png(real_data_dir) -> bytes:
    return (real_data_dir / "00000001_000.png").read_bytes()


def test_api_key_is_required_and_compared(server, png):
    headers = {"Content-Type": "image/png"}
    for key_headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}):
        response = httpx.post(f"{server}/v1/predict", content=png, headers={**headers, **key_headers}, timeout=60)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{server}/v1/model", timeout=60).status_code == 401
    assert httpx.get(f"{server}/v1/model", headers={"X-API-Key": KEY}, timeout=60).status_code == 200
    assert httpx.get(f"{server}/healthz", timeout=60).status_code == 200  # probes need no key
    ok = httpx.post(f"{server}/v1/predict", content=png, headers={**headers, "X-API-Key": KEY}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["batch_size"] == 1


def test_overload_answers_503_json_at_once(ray_cluster, server, png):
    headers = {"Content-Type": "image/png", "X-API-Key": KEY}

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=60, headers=headers) as client:
            first = asyncio.create_task(client.post("/v1/predict", content=png))
            await asyncio.sleep(1.0)  # `first` now holds the only model slot for HOLD_S
            probes, rejected = [], None
            while rejected is None and not first.done():
                probe = asyncio.create_task(client.post("/v1/predict", content=png))
                probes.append(probe)
                await asyncio.sleep(0.2)
                for p in probes:
                    if p.done() and p.result().status_code == 503:
                        rejected = p.result()
            started = time.monotonic()
            results = [await first] + [await p for p in probes]
            return rejected, results, time.monotonic() - started

    rejected, results, _ = asyncio.run(scenario())
    assert rejected is not None, [r.status_code for r in results]
    assert rejected.json()["error"]["code"] == "overloaded"
    assert rejected.headers.get("retry-after") == "1"
    assert rejected.elapsed.total_seconds() < HOLD_S  # refused at once, not after queueing
    assert results[0].status_code == 200
    assert {r.status_code for r in results} <= {200, 503}
    # ... and is counted on a real scrape of Ray's Prometheus endpoint (README "Metrics").
    mine = {"application": APP}
    samples = wait_for_scrape(metrics_url(ray_cluster), lambda s: (
        total(s, "ray_cxr_ray_serve_overloaded_total", reason="ModelBusyError", **mine) >= 1  # fused: admission
        and total(s, "ray_cxr_ray_serve_requests_total", route=f"{PREFIX}/v1/predict", status="503",
                  error_code="overloaded", **mine) >= 1
    ))
    # Requests waited for the model slot: the admission gauge exists for this app.
    assert any(tags.get("queue") == "admission" and tags.get("application") == APP
               for tags, _ in samples["ray_cxr_ray_serve_queue_depth"])

