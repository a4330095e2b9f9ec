"""The inference engines by name: what each runs, at which precisions, and what ``auto`` means for it.

Plain data, no torch / ONNX Runtime / TensorRT import, so the CLI builds its
``--backend`` / ``--precision`` choices and help from here in no time. Adding
an engine is one folder ``cxr_ray/engines/<name>/`` (``runtime.py`` with its
:class:`~cxr_ray.engines.base.Backend`, ``build.py`` with a ``provision``
function) and one :func:`register_engine` call below.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from cxr_ray.errors import UsageError

AUTO = "auto"


@dataclass(frozen=True)
class Engine:
    """One engine and its precision rules (the only place they are written)."""

    name: str
    # "module:function" that builds a ready Backend for (artifact root, card, EngineRequest);
    # resolved by cxr_ray.engines.load only when this engine is asked for.
    provision: str
    precisions: tuple[str, ...]  # what it runs at all
    auto_on_cpu: str  # what precision "auto" means on a CPU ...
    auto_on_gpu: str  # ... and on a GPU
    # Why a precision outside ``precisions`` is refused ({precision} is filled in).
    refusal: str = "{engine} runs {valid}; got precision={precision}"
    # Precisions it has, but refuses on a CPU, and why.
    refused_on_cpu: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    # Where ``auto`` may pick it: lower ranks are tried first; None: never on that side.
    cpu_rank: int | None = None
    gpu_rank: int | None = None
    # "module:function" -> bool: whether it can run on a visible GPU here (packages, providers);
    # asked only when ``auto`` considers it on a GPU, so the registry itself imports nothing.
    gpu_probe: str | None = None
    # The same for a CPU engine that is an optional package (``auto`` skips it where it is false).
    cpu_probe: str | None = None
    gpu_only: bool = False  # no CPU execution at all (``auto`` never picks it on a CPU)

    def runs(self, precision: str, *, on_cpu: bool) -> bool:
        """Whether ``precision`` (``auto`` included) is one this engine runs on that side."""
        try:
            self.resolve_precision(precision, on_cpu=on_cpu)
        except UsageError:
            return False
        return True

    def resolve_precision(self, requested: str, *, on_cpu: bool) -> str:
        """The concrete precision ``requested`` means here; :class:`UsageError` when refused."""
        check_precision(requested)
        precision = (self.auto_on_cpu if on_cpu else self.auto_on_gpu) if requested == AUTO else requested
        if precision not in self.precisions:
            raise UsageError(
                self.refusal.format(engine=self.name, valid=" / ".join(self.precisions), precision=precision)
            )
        if on_cpu and precision in self.refused_on_cpu:
            raise UsageError(self.refused_on_cpu[precision])
        return precision


_ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    """Add an engine; names are unique (and never ``auto``)."""
    if engine.name in _ENGINES or engine.name == AUTO:
        raise ValueError(f"engine {engine.name!r} is already registered")
    _ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    try:
        return _ENGINES[name]
    except KeyError:
        close = difflib.get_close_matches(name, backend_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(backend_names())}.{hint}") from None


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def backend_names() -> tuple[str, ...]:
    """``auto`` and every engine: the ``--backend`` choices."""
    return (AUTO, *_ENGINES)


def auto_candidates(*, on_gpu: bool) -> list[Engine]:
    """The engines ``auto`` tries on a GPU (or a CPU), best first: their ranks, the only place the order is written."""
    ranked = [(e.gpu_rank if on_gpu else e.cpu_rank, i, e) for i, e in enumerate(_ENGINES.values())]
    return [engine for rank, _, engine in sorted((r, i, e) for r, i, e in ranked if r is not None)]


def precision_names() -> tuple[str, ...]:
    """``auto`` and every precision some engine runs: the ``--precision`` choices."""
    names: list[str] = []
    for engine in _ENGINES.values():
        names += [p for p in engine.precisions if p not in names]
    # widest first (fp32, fp16, bf16, int8), registration order among equals
    return (AUTO, *sorted(names, key=lambda name: -int("".join(c for c in name if c.isdigit()) or 0)))


def check_precision(precision: str) -> None:
    """Refuse a precision name no engine knows (a :class:`UsageError` naming the valid ones)."""
    if precision not in precision_names():
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(precision_names())}")


# ``auto`` on a GPU: a TensorRT plan (cached per GPU in the artifact, sha-checked), then ONNX Runtime's
# TensorRT execution provider, then ONNX Runtime's CUDA provider (fp32 only, so only for an explicit
# fp32: as on CPUs, where it is the fastest fp32 engine measured; on GPUs this order is not measured
# yet), then torch on CUDA (fp16 autocast by default, checked against fp32 at load).
# On a CPU: OpenVINO where it is installed (fp32 at least as fast as ONNX Runtime's on DenseNet-121: 0.96x
# on the AVX-512 EPYC here, 1.63x reported on AVX2-only machines; bf16 1.87x where the CPU has it), checked
# against ONNX Runtime fp32 at load (``auto`` falls back to the next one when that check fails); then ONNX
# Runtime, then torch.
register_engine(Engine(
    name="tensorrt",
    provision="cxr_ray.engines.tensorrt.build:provision",
    precisions=("fp32", "fp16", "int8"),
    auto_on_cpu="fp16",  # TensorRT has no CPU: the device check refuses it first
    auto_on_gpu="fp16",
    refusal="TensorRT engines here are fp32, fp16 or int8; {precision} is for the torch backend",
    summary="TensorRT plans built from the ONNX graph, cached per GPU in the artifact",
    gpu_rank=0,
    gpu_probe="cxr_ray.engines.tensorrt.runtime:tensorrt_available",
    gpu_only=True,
))
register_engine(Engine(
    name="onnxruntime",
    provision="cxr_ray.engines.onnxruntime.build:provision",
    precisions=("fp32",),
    auto_on_cpu="fp32",
    auto_on_gpu="fp32",
    refusal="onnxruntime runs fp32 only; for precision={precision} use the torch backend "
    "(bf16 on CPUs with bf16 instructions, fp16 / bf16 on GPUs), onnxruntime-trt (fp16) or tensorrt (fp16 / int8)",
    summary="the artifact's ONNX graph, the fastest fp32 engine measured on CPUs (CUDA provider with onnxruntime-gpu)",
    cpu_rank=1,
    gpu_rank=2,
    gpu_probe="cxr_ray.engines.onnxruntime.runtime:cuda_provider_available",
))
register_engine(Engine(
    name="torch",
    provision="cxr_ray.engines.torch.build:provision",
    precisions=("fp32", "fp16", "bf16"),
    auto_on_cpu="fp32",
    auto_on_gpu="fp16",
    refusal="{precision} needs a calibrated TensorRT engine (--backend tensorrt); torch runs fp32 / fp16 / bf16",
    refused_on_cpu={"fp16": "fp16 on the CPU is slower than fp32 (no fp16 convolution kernels); use fp32 or bf16"},
    summary="eager (or compiled / CUDA-graph) PyTorch: the reference, bf16 on CPUs that have it, fp16 on GPUs",
    cpu_rank=2,
    gpu_rank=3,
    gpu_probe="torch.cuda:is_available",
))
register_engine(Engine(
    name="onnxruntime-trt",
    provision="cxr_ray.engines.onnxruntime.build:provision_tensorrt_provider",
    precisions=("fp32", "fp16"),
    auto_on_cpu="fp16",  # no CPU: refused first
    auto_on_gpu="fp16",
    refusal="onnxruntime-trt (ONNX Runtime's TensorRT provider) runs fp32 or fp16; got precision={precision}",
    summary="the artifact's ONNX graph on ONNX Runtime's TensorRT execution provider (onnxruntime-gpu + TensorRT)",
    gpu_rank=1,
    gpu_probe="cxr_ray.engines.onnxruntime.runtime:tensorrt_provider_available",
    gpu_only=True,
))

register_engine(Engine(
    name="openvino",
    provision="cxr_ray.engines.openvino.build:provision",
    precisions=("fp32", "bf16", "int8"),
    auto_on_cpu="fp32",
    auto_on_gpu="fp32",  # CPU plugin only: never a GPU candidate
    refusal="openvino (CPU plugin) runs fp32, bf16 (CPUs with AVX512-BF16 / AMX) or int8 (NNCF, calibrated); "
    "got precision={precision}",
    summary="the artifact's ONNX graph on OpenVINO's CPU plugin (optional: pip install 'cxr-ray[openvino]'), "
    "checked against ONNX Runtime fp32 at load",
    cpu_rank=0,
    cpu_probe="cxr_ray.engines.openvino.runtime:openvino_available",
))

BACKEND_NAMES = backend_names()
PRECISION_NAMES = precision_names()
