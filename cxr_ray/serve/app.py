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
import uuid
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from cxr_ray.errors import DecodeError
from cxr_ray.serve.admission import ModelAdmission, ModelBusyError
from cxr_ray.serve.api import (
    ACCEPTED_TYPES,
    ERROR_CODES,
    GENERIC_TYPES,
    IMAGE_TYPES,
    MULTIPART_TYPE,
    ErrorResponse,
    ExplainMethod,
    HealthResponse,
    ModelInfo,
    PredictResponse,
    error_body,
    media_type,
)
from cxr_ray.serve.config import ServeArgs
from cxr_ray.serve.predictor import CxrPredictor

logger = logging.getLogger("ray.serve")

# Longest side of the decoded image sent to the predictor for an explanation overlay.
EXPLAIN_MAX_SIDE = 1024


class ApiError(Exception):
    """An answer other than 200, rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


api = FastAPI(
    title="cxr-ray",
    summary="Chest X-ray screening: one image in, class probabilities out.",
    description=(
        "POST an image (DICOM, PNG or JPEG) to `/v1/predict` as the raw body or as the multipart "
        "field `file`. Errors are JSON `{\"error\": {\"code\", \"message\"}}`; 422 codes are the "
        "decoder's (`lateral_view`, `not_an_image`, ...)."
    ),
    version="1",
)
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has a key")
ApiKey = Annotated[str | None, Security(_api_key_header)]
ExplainQuery = Annotated[ExplainMethod | None, Query(description="add a heatmap overlay (PNG, base64)")]


def _error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    request.state.error_code = exc.code
    return _error_response(exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = ERROR_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
    request.state.error_code = code
    return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 by default; here 422 means "not a usable X-ray", so
    # malformed requests (bad query parameters...) are 400.
    parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()]
    request.state.error_code = "bad_request"
    return _error_response(400, "bad_request", "; ".join(parts) or "malformed request")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("request_id=%s unexpected %s", _request_id(request), type(exc).__name__)
    request.state.error_code = "internal"
    return _error_response(500, "internal", "internal error; see the server log for this request id")


class AccessLog:
    """One line per request: id, route, status, latency, error code. Nothing about the patient.

    Plain ASGI rather than ``@api.middleware("http")``: Starlette's BaseHTTPMiddleware
    added 0.35 ms to every request here (0.25 -> 0.6 ms for a bare 200 KB POST).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception left the app

        async def send_recording_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            request = Request(scope)  # shares scope["state"]: the id and error code the handlers set
            logger.info(
                "cxr-ray request_id=%s path=%s status=%d latency_ms=%.1f error_code=%s",
                _request_id(request), scope.get("path", ""), status,
                (time.perf_counter() - start) * 1000, getattr(request.state, "error_code", None) or "-",
            )


api.add_middleware(AccessLog)


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid:
        return rid
    try:  # the id Serve's proxy assigned (also sent back as the X-Request-Id header)
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a replica (e.g. a plain ASGI test)
        rid = ""
    rid = rid or request.headers.get("x-request-id") or uuid.uuid4().hex
    request.state.request_id = rid
    return rid


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image itself, or multipart/form-data with the field `file`",
        "content": {
            "application/dicom": _BINARY,
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/octet-stream": _BINARY,
            MULTIPART_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


def _errors(*statuses: int) -> dict:
    text = {
        400: "malformed request", 401: "missing or wrong X-API-Key", 413: "body larger than the limit",
        415: "unsupported Content-Type", 422: "undecodable, or not a frontal chest X-ray",
        500: "internal error", 503: "overloaded, retry later",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


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
            self._local = CxrPredictor.func_or_class(args)
            self._admission = ModelAdmission(
                self.args.predictor.max_ongoing_requests, self.args.predictor.max_queued_requests
            )
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
    def _check_key(self, given: str | None) -> None:
        if self._api_key is None:
            return
        if not given or not hmac.compare_digest(given.encode(), self._api_key):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = self._local.info() if self._local is not None else await self.predictor.info.remote()
        return self._info

    async def _run_model(self, tensor: np.ndarray, pixels: np.ndarray | None, method: str | None):
        """(prediction, heatmap or None) from the model stage; 503 when it is at capacity."""
        try:
            if self._local is None:
                result = await self.predictor.predict.remote(tensor)
                heatmap = await self.predictor.explain.remote(pixels, method) if method else None
            else:
                async with self._admission.admit():
                    result = await self._local.predict(tensor)
                    heatmap = await self._local.explain(pixels, method) if method else None
        except (BackPressureError, DeploymentUnavailableError, ModelBusyError) as exc:
            raise ApiError(503, "overloaded", f"model is at capacity ({type(exc).__name__}); retry later",
                           headers={"Retry-After": "1"}) from None
        return result, heatmap

    def check_health(self) -> None:
        """Serve calls this periodically; a broken backend in a fused replica marks it unhealthy."""
        if self._local is not None:
            self._local.check_health()

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it exceeds the limit (never buffered unbounded)."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ApiError(400, "bad_request", "Content-Length is not an integer") from None
            if size > limit:
                raise ApiError(413, "too_large", f"body of {size} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        return bytes(body)

    async def _image_bytes(self, request: Request) -> tuple[bytes, str | None]:
        """(image bytes, format announced by the client or None) from a raw or multipart body."""
        content_type = media_type(request.headers.get("content-type"))
        if content_type != MULTIPART_TYPE and content_type not in IMAGE_TYPES and content_type not in GENERIC_TYPES:
            raise ApiError(
                415, "unsupported_media_type",
                f"Content-Type {content_type!r} is not accepted; use one of {', '.join(ACCEPTED_TYPES)}",
            )
        body = await self._read_body(request)
        if content_type != MULTIPART_TYPE:
            return body, IMAGE_TYPES.get(content_type)
        return await self._multipart_file(request, body)

    async def _multipart_file(self, request: Request, body: bytes) -> tuple[bytes, str | None]:
        sent = False

        async def replay() -> dict:  # hand the already size-checked body to Starlette's parser
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except (MultiPartException, StarletteHTTPException, ValueError, KeyError) as exc:
            raise ApiError(400, "bad_request", f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "bad_request", "multipart body has no file field named 'file'")
            part_type = media_type(upload.content_type)
            if part_type not in IMAGE_TYPES and part_type not in GENERIC_TYPES:
                raise ApiError(
                    415, "unsupported_media_type",
                    f"file part Content-Type {part_type!r} is not accepted; use one of {', '.join(sorted(IMAGE_TYPES))}",
                )
            return await upload.read(), IMAGE_TYPES.get(part_type)
        finally:
            await form.close()

    def _decode(self, data: bytes, declared: str | None, request_id: str, preprocess_config: dict, keep_pixels: bool):
        """CPU part of a request (runs in a worker thread): bytes -> model input.

        ``keep_pixels``: also return the decoded image (longest side capped) for an overlay.
        """
        from cxr_ray.io.decode import decode_image, sniff_format
        from cxr_ray.preprocess import PreprocessConfig, preprocess

        start = time.perf_counter()
        warnings: list[str] = []
        sniffed = sniff_format(data)
        if declared and sniffed and declared != sniffed:
            warnings.append(f"content_type_mismatch: declared {declared}, content is {sniffed}")
        config = PreprocessConfig.from_dict(preprocess_config)
        # Exactly what screening runs: decode (hinted with the model's input size) + preprocess.
        # The name shows up in error messages: never the client's file name (may be PHI).
        image = decode_image(
            data, f"request {request_id}", policy=self.args.decode_policy, target_size=config.image_size
        )
        tensor = preprocess(image.pixels, config)
        decode_ms = (time.perf_counter() - start) * 1000
        pixels = image.pixels if keep_pixels else None
        if pixels is not None and max(pixels.shape) > EXPLAIN_MAX_SIDE:
            scale = EXPLAIN_MAX_SIDE / max(pixels.shape)
            h, w = (max(1, round(s * scale)) for s in pixels.shape)
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        return tensor, image.meta, pixels, warnings, decode_ms

    # ---- routes ------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_errors(400, 401, 413, 415, 422, 500, 503),
        openapi_extra=_PREDICT_BODY,
        summary="Screen one chest X-ray",
    )
    async def predict(
        self,
        request: Request,
        explain: ExplainQuery = None,
        api_key: ApiKey = None,
    ) -> PredictResponse:
        start = time.perf_counter()
        request_id = _request_id(request)
        self._check_key(api_key)
        data, declared = await self._image_bytes(request)
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
        del data
        result, heatmap = await self._run_model(tensor, pixels, explain.value if explain is not None else None)
        timing = {"read_ms": read_ms, "decode_ms": decode_ms, "model_ms": float(result["model_ms"]), "start": start}
        return self._response(request_id, info, meta, warnings, result, timing, explain, heatmap)

    @staticmethod
    def _response(request_id, info, meta, warnings, result, timing, explain, heatmap) -> PredictResponse:
        classes = info["classes"]
        probs = [float(p) for p in result["probabilities"]]
        positive = info["positive_class"]
        score = probs[classes.index(positive)] if positive in classes else None
        threshold = float(info["threshold"])
        return PredictResponse(
            request_id=request_id,
            label=classes[int(np.argmax(probs))],
            probabilities=dict(zip(classes, probs, strict=True)),
            score=score,
            flagged=None if score is None else bool(score >= threshold),
            threshold=threshold,
            positive_class=positive,
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

    @api.get("/v1/model", response_model=ModelInfo, responses=_errors(401, 503), summary="The model card")
    async def model(self, api_key: ApiKey = None) -> ModelInfo:
        self._check_key(api_key)
        return ModelInfo(**await self._model_info())

    @api.get("/healthz", response_model=HealthResponse, responses=_errors(503), summary="Liveness / readiness")
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
        return CxrIngress.options(**args.ingress.serve_options()).bind(None, plain)
    predictor = CxrPredictor.options(**args.predictor.serve_options()).bind(plain)
    return CxrIngress.options(**args.ingress.serve_options()).bind(predictor, plain)
