"""Scraping the session Ray's Prometheus endpoint, for the tests of the cxr_ray_* series.

The node's metrics agent serves every worker's ``ray.util.metrics`` / ``ray.serve.metrics``
series at ``http://<node>:<MetricsExportPort>/metrics`` (a random port unless
``--metrics-export-port`` / ``_metrics_export_port`` sets it; ``ray.nodes()`` says which).
Workers report to the agent every few seconds, so checks poll with a bounded wait.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_WAIT_S = 120  # generous: the agent's export interval is seconds, and this machine's CPUs are shared

Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_url(ray) -> str:
    """The session node's Prometheus endpoint, on loopback."""
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
