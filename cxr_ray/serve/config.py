"""Typed arguments of the Serve application (``args:`` in ``deploy/serve.yaml``).

Plain pydantic, no Ray import: the CLI, the benchmark and Serve's config loader
all validate the same model, and a typo in the YAML fails with the field name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tta import MAX_VIEWS
from cxr_ray.io.types import DecodePolicy

# The registry's names (cxr_ray.engines.registry.BACKEND_NAMES; a test holds them equal).
BackendName = Literal["auto", "tensorrt", "onnxruntime", "torch", "onnxruntime-trt", "openvino"]
PrecisionName = Literal["auto", "fp32", "fp16", "bf16", "int8"]
# fused: one deployment decodes and predicts (CPU nodes, one machine); split: decode in
# CxrIngress, batched inference in CxrPredictor replicas (GPU clusters). See cxr_ray.serve.app.
TopologyName = Literal["fused", "split"]
# cxr_ray.io.gpu.mode.DECODE_MODES (a test holds them equal); see cxr_ray.serve.decoding.
DecodeName = Literal["auto", "cpu", "gpu"]


class AutoscalingArgs(BaseModel):
    """Serve's ``autoscaling_config`` (a subset; Serve's defaults for the rest)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: PositiveInt = 4
    # Requests in flight per replica the autoscaler aims for. For the batched
    # model this is about one full batch; for the ingress, concurrent decodes.
    target_ongoing_requests: PositiveFloat = 8
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentArgs(BaseModel):
    """Replica count / autoscaling and admission limits of one deployment.

    ``max_queued_requests`` bounds the queue in front of the replicas: beyond
    ``replicas * max_ongoing_requests + max_queued_requests`` requests in flight,
    callers get 503 at once instead of waiting without end.
    """

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt | None = None  # fixed count; None = autoscaling (or 1)
    autoscaling: AutoscalingArgs | None = None
    max_ongoing_requests: PositiveInt = 16
    max_queued_requests: int = Field(32, ge=-1)  # -1 = unbounded (not recommended)
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)  # num_cpus, num_gpus, runtime_env...

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentArgs:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1 (Serve's rule)")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


# Admission limits are layered on purpose: the predictor (32 running per replica + 32
# queued per caller) sheds load before the ingress (128 running) is full, so overload
# is answered by our JSON 503. Were the ingress full first, Serve's proxy would answer
# with its own plain-text 503 (see ServeArgs.layering_problems).
def _autoscaled(max_replicas: int, ongoing: int, queued: int) -> DeploymentArgs:
    return DeploymentArgs(
        autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=16),
        max_ongoing_requests=ongoing,
        max_queued_requests=queued,
        ray_actor_options={"num_cpus": 1},
    )


def _default_ingress() -> DeploymentArgs:
    # Decode + preprocess run here (CPU), so scale on concurrent requests.
    return _autoscaled(max_replicas=4, ongoing=128, queued=64)


def _default_predictor() -> DeploymentArgs:
    # Batched inference: one replica per device; ongoing >= 2 x max_batch_size so a
    # batch can fill while the previous one runs.
    return _autoscaled(max_replicas=2, ongoing=32, queued=32)


class ServeArgs(BaseModel):
    """Arguments of ``cxr_ray.serve.app:app_builder``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model artifact directory: local path or s3:// URI")
    backend: BackendName = "auto"
    # auto: fp16 on GPUs, fp32 on CPUs; bf16 opts in on CPUs with bf16 instructions (see load_backend)
    precision: PrecisionName = "auto"
    device: str | None = None  # e.g. "cuda:0"; None = backend's choice
    num_threads: PositiveInt | None = None  # intra-op threads of the backend
    tta: int = Field(1, ge=1, le=MAX_VIEWS)  # test-time augmentation views per image (cxr_ray.engines.tta)
    # The "engine" options (EngineRequest; cxr-ray serve's --calibration ...): passed unchanged to load_backend.
    calibration: str | None = None  # int8: the images it is calibrated on (manifest, folder, glob; local or s3://)
    calibration_images: PositiveInt = EngineRequest.calibration_images
    verify_labels: str | None = None  # a labelled set: real images and an AUC check in the load-time check
    verify_images: PositiveInt = EngineRequest.verify_images
    max_prob_diff: float | None = Field(None, ge=0)  # replaces the engine's tolerance vs ONNX Runtime fp32
    s3_endpoint: str | None = None
    # Name of an environment variable holding the API key; the key itself never
    # appears in the config. None = no key required.
    api_key_env: str | None = None
    max_body_mb: PositiveFloat = 64.0
    max_pixels: PositiveInt = DecodePolicy().max_pixels
    batching: bool = True
    max_batch_size: PositiveInt = 16
    # 0: a batch is whatever queued while the previous one ran, so an idle server answers
    # at once and a busy one still batches. On 2 CPU cores, densenet121, a 5 ms wait put
    # the single-request p50 over decode + model + 20 ms (56.8 vs 52.4) for no throughput.
    # GPUs gain more from full batches: deploy/serve.yaml waits 5 ms.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    explain: bool = True  # allow ?explain=gradcam|lrp (loads the torch model lazily)
    # auto: on the model's GPU in a fused replica whose backend runs on one, else on the CPU.
    decode: DecodeName = "auto"
    topology: TopologyName = "fused"
    # fused: the only deployment (replicas, resources, HTTP admission); split: the decoding one.
    ingress: DeploymentArgs = Field(default_factory=_default_ingress)
    # split: the model deployment. fused: only its max_ongoing_requests / max_queued_requests
    # are used, as the admission limits at the model inside each ingress replica.
    predictor: DeploymentArgs = Field(default_factory=_default_predictor)

    @model_validator(mode="after")
    def _gpu_decode_is_fused(self) -> ServeArgs:
        if self.decode == "gpu" and self.topology != "fused":
            raise ValueError("decode=gpu decodes on the model's GPU, in the replica that holds the model: "
                             "use topology fused (split replicas decode on CPUs)")
        return self

    def layering_problems(self) -> list[str]:
        """Limits that work, but not as intended (the app builder logs them)."""
        problems = []
        # Requests reach the batcher through the model stage's limit and, fused, the replica's own.
        limits = {"predictor": self.predictor.max_ongoing_requests}
        if self.topology == "fused":
            limits["ingress"] = self.ingress.max_ongoing_requests
        for stage, limit in limits.items():
            if self.batching and limit < self.max_batch_size:
                problems.append(
                    f"{stage}.max_ongoing_requests={limit} < max_batch_size={self.max_batch_size}: batches can never fill"
                )
        pred = self.predictor
        # Fused: the limits hold per ingress replica, at its model call.
        replicas = 1 if self.topology == "fused" else (
            pred.num_replicas or (pred.autoscaling.max_replicas if pred.autoscaling else 1)
        )
        capacity = replicas * pred.max_ongoing_requests + pred.max_queued_requests
        if pred.max_queued_requests != -1 and self.ingress.max_ongoing_requests <= capacity:
            problems.append(
                f"ingress.max_ongoing_requests={self.ingress.max_ongoing_requests} <= what the model stage "
                f"admits ({replicas} x {pred.max_ongoing_requests} + {pred.max_queued_requests}): "
                "under overload Serve's proxy answers plain-text 503s before the model stage sheds with JSON ones"
            )
        return problems

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def decode_policy(self) -> DecodePolicy:
        return DecodePolicy(max_pixels=self.max_pixels)
