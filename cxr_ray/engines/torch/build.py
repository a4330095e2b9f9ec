"""Provisioning the torch engine: its precision rules applied, the network loaded, and every
execution other than eager fp32 (bf16 on the CPU, fp16 / bf16 autocast on CUDA, CUDA graphs,
torch.compile) checked against eager fp32 on the same device before it is used."""

from __future__ import annotations

from pathlib import Path

from cxr_ray.engines.contract import tolerance
from cxr_ray.engines.registry import get_engine
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.torch.runtime import TorchBackend, cpu_has_native_bf16, resolve_device
from cxr_ray.errors import BackendUnavailableError
from cxr_ray.models.artifact import load_model
from cxr_ray.models.card import ModelCard


def provision(root: Path, card: ModelCard, request: EngineRequest) -> TorchBackend:
    """The torch backend at the requested precision; CPU bf16 is checked against fp32 first."""
    on_cpu = resolve_device(request.device).type == "cpu"
    precision = get_engine("torch").resolve_precision(request.precision, on_cpu=on_cpu)
    if on_cpu and precision == "bf16" and not cpu_has_native_bf16():
        raise BackendUnavailableError(
            "bf16 on this CPU would be emulated (no AVX512-BF16 / AMX instructions) and slower than fp32; "
            "use precision fp32"
        )
    model, _ = load_model(str(root))
    backend = TorchBackend(
        model, card.classes, card.image_size, device=request.device, precision=precision,
        compile=request.compile, cuda_graphs=request.cuda_graphs, num_threads=request.num_threads,
    )
    if backend.precision != "fp32" or request.compile or request.cuda_graphs:
        backend.verify_against_fp32(atol=tolerance("torch", backend.precision))
    return backend
