"""``cxr-ray bench serve`` end to end on the session's Ray cluster, scaled down
(64 px, a handful of requests): both modes deploy, answer without errors, and the
JSON carries every figure the README quotes."""

from __future__ import annotations

import json

import _serve_testing  # noqa: F401 - shares the session's Serve proxy (one per cluster)
import pytest


@pytest.mark.slow
def test_bench_serve_reports_both_modes(ray_cluster, capsys):
    from _serve_testing import serve_port

    from cxr_ray.cli import main

    serve_port()  # Serve may already run in this session: the bench must find its port
    code = main(["bench", "serve", "--arch", "mobilenet_v2", "--image-size", "64", "--requests", "12",
                 "--concurrency", "1,4", "--max-batch-size", "4", "--threads", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suite"] == "serve" and result["model"]["image_size"] == 64
    assert result["decode_ms"] > 0 and result["model_ms"] > 0
    for mode in ("batched", "unbatched"):
        figures = result["modes"][mode]
        assert not figures["errors"], figures["errors"]
        assert set(figures["throughput_rps"]) == {"1", "4"} and all(v > 0 for v in figures["throughput_rps"].values())
        assert 0 < figures["single_request_latency_ms"]["p50"] <= figures["single_request_latency_ms"]["p95"]
    assert result["modes"]["unbatched"]["mean_batch_size"]["4"] == 1
    assert "throughput_speedup_at_4" in result["checks"] and set(result["checks"]["p50_within_budget"]) == {"batched", "unbatched"}
