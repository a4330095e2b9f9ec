"""ONNX export of an artifact's network, verified with ONNX Runtime against PyTorch before it is trusted.

The graph follows :mod:`cxr_ray.engines.contract` (``image`` -> ``probabilities``,
softmax inside); TensorRT builds its plans from the same graph
(:func:`ensure_onnx`). :func:`provision` is the ONNX Runtime engine's entry in
the registry.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It is
deprecated since torch 2.9 but still present in 2.14, exports all nine
registered architectures in about a second each (the dynamo exporter takes
5-20 s each and needs ``onnxscript``), and its opset-17 graphs parse in
TensorRT 10. ``exporter="dynamo"`` selects the torch.export-based exporter for
when the TorchScript path is removed (needs ``pip install onnxscript``).

One rewrite makes every architecture exportable at every image size: an
``AdaptiveAvgPool2d`` whose input is not a multiple of its output (VGG's 7x7
pool after a 2x2 map at 64 px) is replaced by the same average written as two
constant matrix products. The image size is fixed, so the rewrite is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from cxr_ray.engines.cache import card_lock, file_lock
from cxr_ray.engines.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    VERIFY_BATCH_SIZES,
    fp32_reference,
    max_abs_diff_vs_fp32,
    tolerance,
)
from cxr_ray.engines.onnxruntime.runtime import OnnxRuntimeBackend, create_session
from cxr_ray.engines.registry import get_engine
from cxr_ray.engines.request import EngineRequest
from cxr_ray.errors import ArtifactError, BackendUnavailableError, UsageError
from cxr_ray.models.artifact import (
    CARD_FILE,
    ONNX_FILE,
    cache_root,
    load_card,
    load_model,
    sha256_file,
    write_card,
)
from cxr_ray.models.card import ModelCard, OnnxRecord
from cxr_ray.optional import ONNXSCRIPT_HINT, require
from cxr_ray.progress import stage

log = logging.getLogger(__name__)

# TensorRT 10's ONNX parser supports opsets 9-20; 17 is what its docs and samples use.
DEFAULT_OPSET = 17
DEFAULT_ATOL = tolerance("onnxruntime", "fp32")
EXPORTERS = ("torchscript", "dynamo")


class ExportVerificationError(ArtifactError):
    """An exported graph disagrees with the PyTorch model beyond the tolerance."""


class ProbabilityModel(nn.Module):
    """The network plus its softmax: (N, 1, S, S) -> (N, K) probabilities, computed in float32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image).float(), dim=1)


class FixedAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one known input size, as ``P_h @ x @ P_w^T`` (exportable, exact)."""

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.register_buffer("rows", _pool_matrix(input_size[0], output_size[0]), persistent=False)
        self.register_buffer("cols", _pool_matrix(input_size[1], output_size[1]).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)  # type: ignore[arg-type]


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Row i averages input [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)): PyTorch's adaptive bins."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def make_exportable(model: nn.Module, image_size: int) -> nn.Module:
    """``model``, or a copy of it whose adaptive average pools the TorchScript exporter refuses are rewritten.

    The original is never modified, so verification compares the export with
    the network exactly as trained.
    """
    seen: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module) is nn.AdaptiveAvgPool2d:
            def record(mod, args, name=name):
                seen[name] = tuple(int(v) for v in args[0].shape[-2:])  # type: ignore[assignment]

            hooks.append(module.register_forward_pre_hook(record))
    if not hooks:
        return model
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    replacements = {}
    for name, (height, width) in seen.items():
        size = model.get_submodule(name).output_size
        out_h, out_w = (size, size) if isinstance(size, int) else size  # type: ignore[misc]
        out_h, out_w = out_h or height, out_w or width
        if height % out_h or width % out_w:
            replacements[name] = FixedAdaptiveAvgPool2d((height, width), (out_h, out_w))
    if not replacements:
        return model
    model = copy.deepcopy(model)
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return model


def export_model(
    model: nn.Module,
    image_size: int,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> None:
    """Write ``model`` (logits network, eval mode, CPU) as a probabilities graph to ``path``."""
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown ONNX exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    wrapped = ProbabilityModel(make_exportable(model.eval(), image_size)).eval()
    example = (torch.zeros(2, 1, image_size, image_size),)  # batch 2: never specialise on 1
    if exporter == "dynamo":
        require("onnxscript", ONNXSCRIPT_HINT)
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            wrapped, example, dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
        )
        if program is None:
            raise ExportVerificationError("the dynamo exporter returned no program")
        program.save(os.fspath(path))
        return
    with warnings.catch_warnings():
        # Deprecation notices of the TorchScript exporter and tracer warnings from
        # timm's shape checks: the graph is verified numerically right after.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped,
            example,
            os.fspath(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    image_size: int,
    *,
    batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
) -> float:
    """Max abs difference of ONNX Runtime (CPU) vs eager PyTorch probabilities on sample batches."""
    # Same CPU thread budget as the PyTorch reference (torch.set_num_threads is respected).
    session = create_session(onnx_path, device="cpu", num_threads=torch.get_num_threads())
    declared = {i.name: i.shape for i in session.get_inputs()}
    shape = declared.get(INPUT_NAME)
    if shape is None or list(shape[1:]) != [1, image_size, image_size] or isinstance(shape[0], int):
        raise ExportVerificationError(
            f"{onnx_path}: inputs {declared}; expected {INPUT_NAME!r} of shape (batch, 1, {image_size}, {image_size})"
        )

    def run(batch):
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    try:
        return max_abs_diff_vs_fp32(run, fp32_reference(model), image_size, batch_sizes=batch_sizes, what=str(onnx_path))
    except ValueError as exc:  # the graph's output shape is not the model's
        raise ExportVerificationError(str(exc)) from None


def local_artifact(artifact_dir: str | os.PathLike) -> Path:
    text = os.fspath(artifact_dir)
    if "://" in text and not text.startswith("file://"):
        raise UsageError(
            f"{text}: export writes into the artifact, so it needs a local directory; "
            "copy it locally, export, and upload the directory back"
        )
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    if not (path / CARD_FILE).is_file():
        raise ArtifactError(f"{text}: not a model artifact (no {CARD_FILE})")
    return path


def _export_verified(
    model: nn.Module, card: ModelCard, tmp: Path, *, opset: int, exporter: str, verify: bool, atol: float, where: Path
) -> OnnxRecord:
    """Export to ``tmp``, compare with PyTorch (unless ``verify`` is off) and return the card's record."""
    stage(f"tracing {card.arch} to ONNX (opset {opset}, {exporter} exporter)")
    export_model(model, card.image_size, tmp, opset=opset, exporter=exporter)
    if verify:
        stage(f"verifying with ONNX Runtime against PyTorch on batches of {list(VERIFY_BATCH_SIZES)}")
    diff = verify_onnx(model, tmp, card.image_size) if verify else None
    if diff is not None:
        log.info("ONNX export of %s: max abs diff vs PyTorch %.3g", card.name, diff)
        if diff > atol:
            raise ExportVerificationError(
                f"{where}: ONNX Runtime and PyTorch disagree by {diff:.3g} (> atol {atol:.3g}) "
                f"on sample batches of {list(VERIFY_BATCH_SIZES)}; model.onnx was not written"
            )
    return onnx_record(tmp, card, opset=opset, max_abs_diff=diff, atol=atol if verify else None, exporter=exporter)


def export_onnx(
    artifact_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    exporter: str = "torchscript",
) -> dict:
    """Export the artifact's network to ``model.onnx`` and record it in ``model.json``.

    With ``verify`` (the default) the graph is run by ONNX Runtime on batches of
    1 and 3 and compared with PyTorch; above ``atol`` (absolute, on
    probabilities) :class:`ExportVerificationError` is raised and nothing is
    written. Returns the record stored as the card's ``onnx`` field plus
    ``path``.
    """
    root = local_artifact(artifact_dir)
    stage(f"loading {root}")
    model, card = load_model(str(root))
    tmp = root / f".{ONNX_FILE}.tmp-{os.getpid()}"
    try:
        record = _export_verified(model, card, tmp, opset=opset, exporter=exporter, verify=verify, atol=atol, where=root)
        with card_lock(root):
            os.replace(tmp, root / ONNX_FILE)
            fresh = load_card(str(root))
            fresh.onnx = record
            write_card(root, fresh)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {**record, "path": str(root / ONNX_FILE)}


def onnx_record(
    path: Path,
    card: ModelCard,
    *,
    opset: int,
    max_abs_diff: float | None,
    atol: float | None,
    exporter: str,
) -> OnnxRecord:
    return OnnxRecord(
        file=ONNX_FILE,
        sha256=sha256_file(path),
        opset=opset,
        max_abs_diff=max_abs_diff,
        atol=atol,
        verified_batch_sizes=list(VERIFY_BATCH_SIZES) if max_abs_diff is not None else [],
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        input=INPUT_NAME,
        input_shape=["batch", 1, card.image_size, card.image_size],
        output=OUTPUT_NAME,
        output_shape=["batch", len(card.classes)],
        image_size=card.image_size,
        model_version=card.version,
        exporter=exporter,
        torch_version=torch.__version__,
    )


def _recorded_onnx(root: Path, record: OnnxRecord, version: str) -> tuple[Path, str]:
    path = root / record.get("file", ONNX_FILE)
    if not path.is_file():
        raise ArtifactError(f"{root}: model.json records {record.get('file')} but the file is missing")
    recorded_for = record.get("model_version")
    if recorded_for and version and recorded_for != version:
        raise ArtifactError(
            f"{root}: model.onnx was exported from version {recorded_for}, the weights are version "
            f"{version}; re-run `cxr-ray export --format onnx`"
        )
    if not record.get("sha256"):
        raise ArtifactError(f"{root}: model.json records model.onnx without a sha256")
    return path, record["sha256"]


def ensure_onnx(root: Path, card: ModelCard, *, opset: int = DEFAULT_OPSET) -> tuple[Path, str]:
    """The artifact's ONNX graph and its sha256, exporting one into the local cache if it has none.

    A recorded ``model.onnx`` is used as is (its sha256 is checked by the
    engine that loads it); an artifact without one gets a verified export in
    ``$CXR_RAY_CACHE/onnx/<version>-<size>/`` (default ``~/.cache/cxr-ray``),
    built once per node under a file lock. The artifact itself is not touched.
    """
    if card.onnx:
        return _recorded_onnx(root, card.onnx, card.version)
    directory = cache_root() / "onnx" / f"{card.version or 'unversioned'}-{card.image_size}-op{opset}"
    directory.mkdir(parents=True, exist_ok=True)
    path, sidecar = directory / ONNX_FILE, directory / "onnx.json"
    with file_lock(directory / ".lock"):
        if path.is_file() and sidecar.is_file():
            cached = json.loads(sidecar.read_text())
            if cached.get("sha256") == sha256_file(path):
                return path, cached["sha256"]
        model, card = load_model(str(root))
        tmp = directory / f".{ONNX_FILE}.tmp-{os.getpid()}"
        try:
            record = _export_verified(model, card, tmp, opset=opset, exporter="torchscript", verify=True,
                                      atol=DEFAULT_ATOL, where=root)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        sidecar.write_text(json.dumps(record, indent=2))
        log.info("exported %s to the ONNX cache %s (max abs diff %.3g)", card.name, path, record["max_abs_diff"])
        return path, record["sha256"]


def provision(root: Path, card: ModelCard, request: EngineRequest) -> OnnxRuntimeBackend:
    """The ONNX Runtime engine for the artifact: its graph (exported into the cache if need be), sha-checked."""
    get_engine("onnxruntime").resolve_precision(request.precision, on_cpu=True)
    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    device = "cpu" if request.auto and request.device is None else request.device
    return OnnxRuntimeBackend(
        onnx_path, card.classes, card.image_size, device=device, num_threads=request.num_threads,
        expected_sha256=onnx_sha256,
    )


def provision_tensorrt_provider(root: Path, card: ModelCard, request: EngineRequest) -> OnnxRuntimeBackend:
    """The ``onnxruntime-trt`` engine: the graph on ONNX Runtime's TensorRT provider, checked against
    eager fp32 PyTorch on the same GPU before it is used (refused above its tolerance)."""
    precision = get_engine("onnxruntime-trt").resolve_precision(request.precision, on_cpu=False)
    device = request.device or "cuda"
    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    backend = OnnxRuntimeBackend(
        onnx_path, card.classes, card.image_size, device=device, num_threads=request.num_threads,
        expected_sha256=onnx_sha256, execution="tensorrt", precision=precision,
    )
    model, _ = load_model(str(root))
    atol = tolerance("onnxruntime-trt", precision)
    diff = max_abs_diff_vs_fp32(backend.predict, fp32_reference(model, device), card.image_size,
                                what=f"onnxruntime-trt {precision}")
    if diff > atol:
        raise BackendUnavailableError(
            f"onnxruntime-trt {precision} differs from fp32 PyTorch by {diff:.3g} (> {atol:.3g}) on sample batches"
        )
    backend.verified_max_abs_diff = diff
    return backend
