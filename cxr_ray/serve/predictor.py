"""The model stage: one backend rebuilt from the artifact, fed dynamic batches.

A deployment of its own in the split topology, a plain object inside each
ingress replica in the fused one (:mod:`cxr_ray.serve.app`). Requests arrive
already decoded and preprocessed ((1, S, S) float32), so it spends its time in
the backend only: concurrent requests (everything that queued while the previous
batch ran) go into one ``Backend.predict`` call
(:class:`~cxr_ray.engines.batching.OpportunisticBatcher`). The same
:func:`~cxr_ray.engines.load.load_backend` and artifact as the screening job
give the same numbers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from ray import serve
from torch import nn

from cxr_ray.engines.batching import OpportunisticBatcher
from cxr_ray.engines.load import load_backend
from cxr_ray.engines.request import engine_options
from cxr_ray.explain.methods import Explainer, supported_pairs
from cxr_ray.explain.overlay import overlay_png_bytes
from cxr_ray.models.artifact import load_card, load_model, localize
from cxr_ray.serve.api import card_summary
from cxr_ray.serve.config import ServeArgs
from cxr_ray.serve.metrics import serve_metrics

logger = logging.getLogger("ray.serve")


@serve.deployment(name="CxrPredictor", health_check_period_s=10, health_check_timeout_s=30)
class CxrPredictor:
    """Batched inference plus (lazily) the torch model for explanations."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        # Localise once (s3:// -> cache) so the card, the backend and the torch
        # model for explanations all read the same files.
        self.artifact = str(localize(self.args.model, self.args.s3_endpoint))
        self.card = load_card(self.artifact)
        # One thread owns the backend: loads it, predicts, explains. torch's OpenMP
        # kernels ran about 2x slower when a model was used from several threads
        # (DenseNet-121 bf16, one image, 2 cores: 34 ms on the thread that loaded it,
        # 62-74 ms from asyncio's executor threads), and one caller at a time is
        # what a CPU backend wants anyway: concurrency comes from batching.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model")
        self.backend = self._model_thread.submit(
            load_backend, self.artifact, self.args.backend, device=self.args.device,
            precision=self.args.precision, num_threads=self.args.num_threads, tta=self.args.tta,
            s3_endpoint=self.args.s3_endpoint, **engine_options(self.args),
        ).result()
        self._torch_model: nn.Module | None = None
        self._explainers: dict[str, Any] = {}
        self._probe = np.zeros((1, *self.backend.input_spec.shape), dtype=np.float32)
        # Unbatched is the same queue with batches of one: one backend call per request.
        self._batcher = OpportunisticBatcher(
            self._run_backend,
            max_batch_size=self.args.max_batch_size if self.args.batching else 1,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s if self.args.batching else 0.0,
        )
        logger.info(
            "cxr-ray predictor ready: model=%s version=%s backend=%s batching=%s max_batch_size=%d",
            self.card.name, self.card.version, self.backend.name, self.args.batching, self.args.max_batch_size,
        )

    # ---- inference -------------------------------------------------------
    async def predict(self, image: Any) -> dict[str, Any]:
        """(1, S, S) preprocessed image -> {"probabilities": [K], "label", "score", "flagged", "batch_size", "model_ms"}."""
        return await self._batcher.submit(image)

    async def _run_backend(self, images: list[Any]) -> list[dict[str, Any]]:
        # GPU-decoded requests are (1, S, S) tensors on the model's GPU: stacked there, never copied out.
        batch = torch.stack(images) if isinstance(images[0], torch.Tensor) else np.stack(images).astype(np.float32, copy=False)
        # The model thread keeps the event loop free to admit the next batch.
        probs, model_ms = await asyncio.get_running_loop().run_in_executor(self._model_thread, self._timed_predict, batch)
        decisions = self.card.decide(probs)
        n = len(images)
        serve_metrics().batch(self.backend.name, n, model_ms, self._batcher.queued)
        return [
            {
                "probabilities": [float(p) for p in decisions.probabilities[i]],
                "label": decisions.labels[i],
                "score": None if decisions.scores is None else float(decisions.scores[i]),
                "flagged": None if decisions.flagged is None else bool(decisions.flagged[i]),
                "batch_size": n,
                "model_ms": model_ms,
            }
            for i in range(n)
        ]

    def _timed_predict(self, batch: Any) -> tuple[np.ndarray, float]:
        """On the model thread: (probabilities, ms in the backend), not counting the wait for the thread."""
        start = time.perf_counter()
        probs = self.backend.predict_tensor(batch) if isinstance(batch, torch.Tensor) else self.backend.predict(batch)
        return probs, (time.perf_counter() - start) * 1000

    # ---- explanations ----------------------------------------------------
    async def explain(self, pixels: np.ndarray, method: str) -> str:
        """Heatmap overlay for a decoded (H, W) image, as base64 PNG (not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._explain_sync, pixels, method)

    def _explain_sync(self, pixels: np.ndarray, method: str) -> str:
        """On the model thread (no lock needed): torch model + one Explainer per method, built on first use."""

        explainer = self._explainers.get(method)
        if explainer is None:
            if self._torch_model is None:
                self._torch_model, _ = load_model(self.artifact)
            explainer = self._explainers[method] = Explainer(self._torch_model, self.card, method)
        result = explainer.explain(pixels)
        return base64.b64encode(overlay_png_bytes(pixels, result.heatmap)).decode("ascii")

    def _explain_methods(self) -> list[str]:
        if not self.args.explain:
            return []
        return [method for arch, method in supported_pairs() if arch == self.card.arch]

    # ---- metadata / health -------------------------------------------------
    def info(self) -> dict[str, Any]:
        out = card_summary(asdict(self.card))
        out["backend"] = self.backend.label
        out["verification"] = self.backend.describe().get("verification")
        out["batching"] = {
            "enabled": self.args.batching,
            "max_batch_size": self.args.max_batch_size,
            "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
        }
        out["explain_methods"] = self._explain_methods()
        return out

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (restarted)."""
        probs = self._model_thread.submit(self.backend.predict, self._probe).result()
        if probs.shape != (1, len(self.card.classes)) or not np.all(np.isfinite(probs)):
            raise RuntimeError(
                f"backend {self.backend.name} returned {probs.shape} / non-finite output for a probe batch"
            )
