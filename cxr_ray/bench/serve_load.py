"""``cxr-ray bench serve``'s clients: concurrent POSTs over loopback, and what they measured."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


async def _load(url: str, image: bytes, *, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` clients: latencies, wall time, errors, batch sizes."""

    latencies: list[float] = []
    batch_sizes: list[int] = []
    server_decode: list[float] = []
    server_model: list[float] = []
    server_total: list[float] = []
    server_read: list[float] = []
    errors: dict[str, int] = {}
    remaining = iter(range(requests))
    headers = {"Content-Type": "image/png"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            for _ in remaining:
                start = time.perf_counter()
                try:
                    response = await client.post(url, content=image, headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    key = str(response.status_code)
                    errors[key] = errors.get(key, 0) + 1
                    continue
                body = response.json()
                batch_sizes.append(body["batch_size"])
                server_decode.append(body["timing"]["decode_ms"])
                server_model.append(body["timing"]["model_ms"])
                server_total.append(body["timing"]["total_ms"])
                server_read.append(body["timing"]["read_ms"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = len(batch_sizes)
    return {
        "requests": requests,
        "ok": ok,
        "errors": errors,
        "throughput_rps": round(ok / wall, 2) if wall > 0 else None,
        "latency_ms": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)},
        "mean_batch_size": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
        "server_decode_ms_p50": _percentile(server_decode, 50),
        "server_model_ms_p50": _percentile(server_model, 50),
        "server_total_ms_p50": _percentile(server_total, 50),
        "server_read_ms_p50": _percentile(server_read, 50),
    }


def bench_mode(url: str, image: bytes, *, requests: int, concurrency: tuple[int, ...]) -> dict:
    """Measure one deployed mode: sequential latency, then throughput per client count."""
    asyncio.run(_load(url, image, requests=min(requests, 20), concurrency=max(concurrency)))  # warm-up
    single = asyncio.run(_load(url, image, requests=requests, concurrency=1))
    by_concurrency = {str(c): asyncio.run(_load(url, image, requests=requests, concurrency=c)) for c in concurrency}
    return {
        "single_request_latency_ms": single["latency_ms"],
        "server_decode_ms_p50": single["server_decode_ms_p50"],
        "server_model_ms_p50": single["server_model_ms_p50"],
        # Ingress time (body read -> response built); latency minus this = proxy + HTTP.
        "server_total_ms_p50": single["server_total_ms_p50"],
        "server_read_ms_p50": single["server_read_ms_p50"],
        "throughput_rps": {c: r["throughput_rps"] for c, r in by_concurrency.items()},
        "latency_ms": {c: r["latency_ms"] for c, r in by_concurrency.items()},
        "mean_batch_size": {c: r["mean_batch_size"] for c, r in by_concurrency.items()},
        "errors": {c: r["errors"] for c, r in {"single": single, **by_concurrency}.items() if r["errors"]},
    }
