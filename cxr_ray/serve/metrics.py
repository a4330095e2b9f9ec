"""Prometheus series of the HTTP endpoint (``ray.serve.metrics``), recorded in the replicas.

Serve's metric classes add the ``deployment``, ``replica`` and ``application`` tags of the
replica they are built in, and fill ``route`` from the request being served: the matched
route template (``/v1/predict``), never the raw path. The node's metrics agent serves them
on Ray's Prometheus endpoint with a ``ray_`` prefix (``cxr_ray_serve_requests`` is scraped
as ``ray_cxr_ray_serve_requests_total``); the README's "Metrics" section lists them all.

The objects are built once per replica process, on first use inside it (Serve reads the
replica context when a metric is made, so never at import). Recording is one call per
request or per batch. Tags are low-cardinality: status codes, API error codes (a closed
set), backend names; never a request id, a client address or anything from the image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ray.serve.metrics import Counter, Gauge, Histogram

# Request latency and model time, milliseconds: CPU DenseNet-121 batches run ~50 ms-2 s.
LATENCY_MS_BOUNDARIES = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0]
BATCH_SIZE_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
OK_CODE = "ok"  # error_code tag of answers without an error


@dataclass(frozen=True)
class ServeMetrics:
    requests: Counter
    latency_ms: Histogram
    decode_ms: Histogram
    model_ms: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    overloaded: Counter

    def request(self, status: int, error_code: str | None, latency_ms: float) -> None:
        """One answered HTTP request (``route`` is Serve's: the matched route template)."""
        self.requests.inc(1, tags={"status": str(status), "error_code": error_code or OK_CODE})
        self.latency_ms.observe(latency_ms, tags={})

    def batch(self, backend: str, size: int, model_ms: float, queued: int) -> None:
        """One backend call of ``size`` images; ``queued`` requests still wait for the model behind it."""
        self.model_ms.observe(model_ms, tags={"backend": backend})
        self.batch_size.observe(size, tags={"backend": backend})
        self.queue_depth.set(queued, tags={"queue": "batcher"})

    def admission_waiting(self, waiting: int) -> None:
        """Requests of a fused replica waiting for a model slot (:class:`~cxr_ray.serve.admission.ModelAdmission`)."""
        self.queue_depth.set(waiting, tags={"queue": "admission"})


@functools.cache
def serve_metrics() -> ServeMetrics:
    """This replica's series (built on the first call, which must happen inside the replica)."""
    return ServeMetrics(
        requests=Counter("cxr_ray_serve_requests", "HTTP requests answered, by route, status and API error code.",
                         # Serve annotates tag_keys as Tuple[str] (one key); any number is accepted.
                         tag_keys=("route", "status", "error_code")),  # type: ignore[arg-type]
        latency_ms=Histogram("cxr_ray_serve_request_latency_ms", "Time from request to answer in the replica (ms).",
                             boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("route",)),
        decode_ms=Histogram("cxr_ray_serve_decode_ms", "Decode + preprocess time of one request (ms).",
                            boundaries=LATENCY_MS_BOUNDARIES),
        model_ms=Histogram("cxr_ray_serve_model_ms", "Time of one batched backend call (ms).",
                           boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("backend",)),
        batch_size=Histogram("cxr_ray_serve_batch_size", "Images per backend call (dynamic batching).",
                             boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("backend",)),
        queue_depth=Gauge("cxr_ray_serve_queue_depth", "Requests waiting for the model: in the batcher's queue, "
                          "or for a model slot in a fused replica (admission).", tag_keys=("queue",)),
        overloaded=Counter("cxr_ray_serve_overloaded", "Requests answered 503 because the model was at capacity, "
                           "by cause.", tag_keys=("reason",)),
    )
