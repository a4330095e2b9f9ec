"""The Serve application: a FastAPI ingress, with the batched model in the same replica or behind it.

Two topologies (``ServeArgs.topology``), same API, same numbers:

``fused`` (default)
    One deployment: each ``CxrIngress`` replica reads the request, decodes and
    preprocesses it in a worker thread, and feeds its own batched
    :class:`~cxr_ray.serve.predictor.CxrPredictor` (dynamic batching). One hop
    (proxy -> replica) per request. On CPU nodes this is the faster layout: the
    split one spent about 50 CPU-ms per request on the extra hop (serialising the
    tensor, a second replica's request handling), as much as DenseNet-121 itself.
``split``
    ``CxrIngress`` replicas decode; ``CxrPredictor`` replicas (one per GPU) only
    see (1, S, S) tensors. For GPU clusters, where decoding is the bottleneck and
    should scale on CPU nodes while GPU replicas do nothing but batched inference.

Build it with ``app_builder(ServeArgs(...))`` (or ``serve run deploy/serve.yaml``,
whose ``import_path`` is ``cxr_ray.serve.app:app_builder``). Importing this module
defines the deployments and starts nothing.

No ``from __future__ import annotations`` here: Serve reads the builder's
parameter annotation as a class to validate ``args`` into :class:`ServeArgs`.
"""

import asyncio
import hmac
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cxr_ray.errors import DecodeError
from cxr_ray.io.decode import sniff_format
from cxr_ray.io.inputs import InputPolicy
from cxr_ray.preprocess import PreprocessConfig
from cxr_ray.serve.admission import ModelAdmission, ModelBusyError
from cxr_ray.serve.api import HealthResponse, ModelInfo, PredictResponse
from cxr_ray.serve.config import ServeArgs
from cxr_ray.serve.decoding import RequestDecoder, host_pixels
from cxr_ray.serve.http import (
    PREDICT_BODY,
    ApiError,
    ApiKey,
    ExplainQuery,
    api,
    errors,
    image_bytes,
    request_id_of,
)
from cxr_ray.serve.metrics import serve_metrics
from cxr_ray.serve.predictor import CxrPredictor
from cxr_ray.serve.report import DICOM_TYPE, SR_RESPONSE, SrUnavailable, sr_bytes, wants_dicom

logger = logging.getLogger("ray.serve")

# Longest side of the decoded image sent to the predictor for an explanation overlay.
EXPLAIN_MAX_SIDE = 1024


def _overlay_pixels(pixels: np.ndarray) -> np.ndarray:
    """The decoded image with its longest side capped at ``EXPLAIN_MAX_SIDE`` (the overlay's size)."""
    if max(pixels.shape) <= EXPLAIN_MAX_SIDE:
        return pixels
    scale = EXPLAIN_MAX_SIDE / max(pixels.shape)
    h, w = (max(1, round(s * scale)) for s in pixels.shape)
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


# Serve serialises the class when it is decorated: everything its methods use is defined above.
@serve.deployment(name="CxrIngress")
@serve.ingress(api)
class CxrIngress:
    """HTTP in, decode + preprocess, batched prediction: in this replica (fused) or via the predictor handle."""

    def __init__(self, predictor: DeploymentHandle | None, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.predictor = predictor
        # Fused topology: the model lives here, behind the predictor's admission limits.
        self._local = self._admission = None
        if predictor is None:
            self._local = CxrPredictor.func_or_class(args)  # type: ignore[attr-defined]
            self._admission = ModelAdmission(
                self.args.predictor.max_ongoing_requests, self.args.predictor.max_queued_requests,
                on_waiting=serve_metrics().admission_waiting,
            )
        self._decoder = self._request_decoder()
        self._api_key: bytes | None = None
        if self.args.api_key_env:
            key = os.environ.get(self.args.api_key_env, "")
            if not key:
                # Refuse to start open when a key was asked for: fail loudly, not silently.
                raise RuntimeError(f"api_key_env={self.args.api_key_env!r} is set but that environment variable is empty")
            self._api_key = key.encode()
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()

    # ---- helpers -----------------------------------------------------------
    def _request_decoder(self) -> RequestDecoder | None:
        """Fused: CPU decoding, or (``decode`` gpu / auto, model on a GPU) decoding on the model's GPU.
        Split: None until the first request brings the predictor's preprocessing (CPU decoding)."""
        if self._local is None:
            return None
        config = self._local.card.preprocess_config
        device = getattr(self._local.backend, "device", None)
        gpu = device if isinstance(device, torch.device) and device.type == "cuda" else None
        return RequestDecoder(self.args.decode, self._reading(config), config, gpu)

    def _reading(self, config: PreprocessConfig) -> InputPolicy:
        return InputPolicy(decode=self.args.decode_policy, target_size=config.image_size)

    def _decoder_for(self, preprocess_config: dict) -> RequestDecoder:
        if self._decoder is None:  # split topology: CPU decoding with the predictor's card
            config = PreprocessConfig.from_dict(preprocess_config)
            self._decoder = RequestDecoder("cpu", self._reading(config), config)
        return self._decoder

    def _check_key(self, given: str | None) -> None:
        if self._api_key is None:
            return
        if not given or not hmac.compare_digest(given.encode(), self._api_key):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = self._local.info() if self._local is not None else await self.predictor.info.remote()  # type: ignore[union-attr]
        return self._info

    async def _run_model(self, tensor: np.ndarray, pixels: np.ndarray | None, method: str | None):
        """(prediction, heatmap or None) from the model stage; 503 when it is at capacity."""
        try:
            if self._local is None:
                result = await self.predictor.predict.remote(tensor)  # type: ignore[union-attr]
                heatmap = await self.predictor.explain.remote(pixels, method) if method else None  # type: ignore[union-attr]
            else:
                async with self._admission.admit():  # type: ignore[union-attr]
                    result = await self._local.predict(tensor)
                    heatmap = await self._local.explain(pixels, method) if method else None
        except (BackPressureError, DeploymentUnavailableError, ModelBusyError) as exc:
            serve_metrics().overloaded.inc(1, tags={"reason": type(exc).__name__})
            raise ApiError(503, "overloaded", f"model is at capacity ({type(exc).__name__}); retry later",
                           headers={"Retry-After": "1"}) from None
        return result, heatmap

    def check_health(self) -> None:
        """Serve calls this periodically; a broken backend in a fused replica marks it unhealthy."""
        if self._local is not None:
            self._local.check_health()

    def _decode(self, data: bytes, declared: str | None, request_id: str, preprocess_config: dict, keep_pixels: bool):
        """CPU part of a request (runs in a worker thread): bytes -> model input.

        ``keep_pixels``: also return the decoded image (longest side capped) for an overlay.
        """
        start = time.perf_counter()
        warnings: list[str] = []
        sniffed = sniff_format(data)
        if declared and sniffed and declared != sniffed:
            warnings.append(f"content_type_mismatch: declared {declared}, content is {sniffed}")
        # Exactly what screening runs: decode (hinted with the model's input size) + preprocess,
        # on the CPU or on the model's GPU (cxr_ray.serve.decoding). The name shows up in error
        # messages: never the client's file name (may be PHI).
        tensor, meta, decoded = self._decoder_for(preprocess_config).decode(data, f"request {request_id}")
        decode_ms = (time.perf_counter() - start) * 1000
        serve_metrics().decode_ms.observe(decode_ms)
        pixels = _overlay_pixels(host_pixels(decoded)) if keep_pixels else None
        return tensor, meta, pixels, warnings, decode_ms

    # ---- routes ------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={**SR_RESPONSE, **errors(400, 401, 406, 413, 415, 422, 500, 503)},
        openapi_extra=PREDICT_BODY,
        summary="Screen one chest X-ray",
    )
    async def predict(
        self,
        request: Request,
        explain: ExplainQuery = None,
        api_key: ApiKey = None,
    ) -> PredictResponse | Response:
        start = time.perf_counter()
        request_id = request_id_of(request)
        self._check_key(api_key)
        as_sr = wants_dicom(request.headers.get("accept"))
        if as_sr and explain is not None:
            raise ApiError(400, "bad_request", f"explain={explain.value} cannot be combined with Accept: {DICOM_TYPE} "
                           "(the structured report carries no heatmap); drop one of them")
        data, declared = await image_bytes(request, self.args.max_body_bytes)
        read_ms = (time.perf_counter() - start) * 1000
        info = await self._model_info()
        if explain is not None and explain.value not in info["explain_methods"]:
            raise ApiError(
                400, "bad_request",
                f"explain={explain.value} is not available for {info['arch']} on this server; "
                f"available: {info['explain_methods'] or 'none'}",
            )
        try:
            tensor, meta, pixels, warnings, decode_ms = await asyncio.to_thread(
                self._decode, data, declared, request_id, info["preprocessing"], explain is not None
            )
        except DecodeError as exc:
            raise ApiError(422, exc.code, exc.message) from None
        if as_sr:
            return await self._sr_answer(data, meta.format, tensor, info)
        del data
        result, heatmap = await self._run_model(tensor, pixels, explain.value if explain is not None else None)
        timing = {"read_ms": read_ms, "decode_ms": decode_ms, "model_ms": float(result["model_ms"]), "start": start}
        return self._response(request_id, info, meta, warnings, result, timing, explain, heatmap)

    async def _sr_answer(self, data: bytes, fmt: str, tensor: Any, info: dict[str, Any]) -> Response:
        """``Accept: application/dicom``: the Comprehensive SR of the prediction (cxr_ray.serve.report)."""
        if fmt != "dicom":  # refused before the model runs: an SR is filed under the source's DICOM header
            raise ApiError(406, "not_acceptable", f"Accept: {DICOM_TYPE} needs a DICOM input; this one is "
                           f"{fmt} (ask for application/json instead)")
        result, _ = await self._run_model(tensor, None, None)
        try:
            sr = await asyncio.to_thread(sr_bytes, data, info, result)  # header parse + highdicom: off the loop
        except SrUnavailable as exc:
            raise ApiError(422, "sr_unavailable", str(exc)) from None
        return Response(sr, media_type=DICOM_TYPE)

    @staticmethod
    def _response(request_id, info, meta, warnings, result, timing, explain, heatmap) -> PredictResponse:
        # The decision (label, score, flagged) is the model card's, made in the model stage.
        return PredictResponse(
            request_id=request_id,
            label=result["label"],
            probabilities=dict(zip(info["classes"], result["probabilities"], strict=True)),
            score=result["score"],
            flagged=result["flagged"],
            threshold=float(info["threshold"]),
            positive_class=info["positive_class"],
            model={"name": info["name"], "version": info["version"], "arch": info["arch"], "backend": info["backend"]},
            format=meta.format,
            modality=meta.modality,
            view=meta.view_position,
            rows=meta.rows,
            cols=meta.cols,
            warnings=[*meta.warnings, *warnings],
            batch_size=int(result["batch_size"]),
            timing={
                "read_ms": round(timing["read_ms"], 3),
                "decode_ms": round(timing["decode_ms"], 3),
                "model_ms": round(timing["model_ms"], 3),
                "total_ms": round((time.perf_counter() - timing["start"]) * 1000, 3),
            },
            explain_method=explain,
            heatmap_png_base64=heatmap,
        )

    @api.get("/v1/model", response_model=ModelInfo, responses=errors(401, 503), summary="The model card")
    async def model(self, api_key: ApiKey = None) -> ModelInfo:
        self._check_key(api_key)
        return ModelInfo(**await self._model_info())

    @api.get("/healthz", response_model=HealthResponse, responses=errors(503), summary="Liveness / readiness")
    async def healthz(self) -> HealthResponse:
        try:
            info = await asyncio.wait_for(self._model_info(), timeout=10)
        except (asyncio.TimeoutError, BackPressureError, DeploymentUnavailableError):
            raise ApiError(503, "overloaded", "model deployment is not answering") from None
        return HealthResponse(
            status="ok",
            model={"name": info["name"], "version": info["version"], "arch": info["arch"], "backend": info["backend"]},
        )


def app_builder(args: ServeArgs):
    """Serve application builder (``import_path: cxr_ray.serve.app:app_builder``)."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    for problem in args.layering_problems():
        logger.warning("cxr-ray serve config: %s", problem)
    plain = args.model_dump(mode="json")
    if args.topology == "fused":
        return CxrIngress.options(**args.ingress.serve_options()).bind(None, plain)  # type: ignore[attr-defined]
    predictor = CxrPredictor.options(**args.predictor.serve_options()).bind(plain)  # type: ignore[attr-defined]
    return CxrIngress.options(**args.ingress.serve_options()).bind(predictor, plain)  # type: ignore[attr-defined]
