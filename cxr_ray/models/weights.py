"""Reading weights: state-dict files (local or s3://) and ImageNet starting points.

Two rules keep this safe and predictable:

* Pickle is never executed. ``.safetensors`` files hold no code at all, and
  PyTorch files are read only with ``torch.load(weights_only=True)``, which
  refuses anything but tensors and plain containers.
* ``--pretrained imagenet`` downloads through torchvision's weights enum or
  timm's pretrained config, but first checks in a few seconds that the
  download host (or the configured proxy) is reachable, so an offline cluster
  fails at once with a message that says what to do instead, rather than
  retrying for a minute.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import urllib.request
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import urlparse

import torch
from safetensors.torch import load as load_safetensors

from cxr_ray.errors import UsageError
from cxr_ray.io.storage import read_bytes
from cxr_ray.models.registry import ArchSpec, get_arch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the actual state dict.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema")
# Prefixes wrappers add to every key: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PROBE_TIMEOUT_S = float(os.environ.get("CXR_RAY_DOWNLOAD_PROBE_TIMEOUT", "5"))

NO_NETWORK_HINT = "no network access to download ImageNet weights; pass --pretrained PATH_OR_URI"


class WeightsError(UsageError):
    """A weights file or source cannot be used (wrong format, unsafe, wrong architecture)."""


class WeightsDownloadError(WeightsError):
    """ImageNet weights were asked for by name but cannot be downloaded here."""


# --------------------------------------------------------------------------- state-dict files


def load_state_dict(uri: str, s3_endpoint: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or PyTorch (``.pt/.pth/.bin``) file, on CPU.

    ``uri`` is a local path or any URI :mod:`cxr_ray.io.storage` reads
    (``s3://``). Checkpoint containers are unwrapped (``{"state_dict": ...}``,
    ``{"model": ...}``) and DDP's ``module.`` prefix is removed.
    """

    uri = os.fspath(uri)
    try:
        data = read_bytes(uri, s3_endpoint=s3_endpoint)
    except FileNotFoundError as exc:
        raise WeightsError(f"{uri}: weights file not found") from exc
    kind = _file_kind(uri, data)
    if kind == "safetensors":
        try:
            state = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{uri}: not a valid safetensors file: {exc}") from exc
    else:
        state = _torch_load(uri, data)  # type: ignore[assignment]
    return _unwrap(uri, state)


def _file_kind(uri: str, data: bytes) -> str:
    suffix = PurePosixPath(urlparse(uri).path if "://" in uri else uri).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    # Unknown extension: recognise the content (zip = torch.save, pickle protocol
    # marker = legacy torch.save, little-endian header size then '{' = safetensors).
    if data[:2] == b"PK" or data[:1] == b"\x80":
        return "torch"
    if len(data) > 9 and data[8:9] == b"{":
        return "safetensors"
    valid = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise WeightsError(f"{uri}: not a recognised weights file (expected one of {valid})")


def _torch_load(uri: str, data: bytes) -> object:
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{uri}: refused to load: the file holds Python objects other than tensors "
            f"({_unpickler_detail(exc)}); only weights_only=True loading is allowed, so save "
            f"model.state_dict() with torch.save, or use .safetensors"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{uri}: not a readable PyTorch weights file: {exc}") from exc


def _unpickler_detail(exc: Exception) -> str:
    """The line of torch's long weights_only message that names the offending object."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". Please use")[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0]) if str(exc) else type(exc).__name__


def _unwrap(uri: str, obj: object) -> dict[str, torch.Tensor]:
    for _ in range(4):  # {"model": {"state_dict": ...}} at most a few levels deep
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{uri}: holds {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(
            f"{uri}: no tensors found (top-level keys: {list(obj)[:8]}); "
            f"expected a state dict or one nested under {list(CONTAINER_KEYS)}"
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- ImageNet weights


def imagenet_state_dict(arch: str, source: str, s3_endpoint: str | None = None) -> dict[str, torch.Tensor]:
    """The 3-channel, 1000-class ImageNet state dict of ``arch`` for ``build_model``.

    ``source`` is a path / URI of a torchvision- or timm-format state dict, or
    the literal ``"imagenet"`` to download the official weights (torchvision's
    enum for torchvision archs, timm's pretrained config for timm archs).
    """
    spec = get_arch(arch)
    if source == "imagenet":
        state = _download_imagenet(spec)
    else:
        state = load_state_dict(source, s3_endpoint=s3_endpoint)
    conv_key = f"{spec.first_conv}.weight"
    conv = state.get(conv_key)
    if conv is not None and conv.ndim == 4 and conv.shape[1] != 3:
        raise WeightsError(
            f"{source}: {conv_key} has {conv.shape[1]} input channel(s); ImageNet weights have 3. "
            "To start from an earlier cxr-ray model use --init-from instead of --pretrained."
        )
    return state


def _download_imagenet(spec: ArchSpec) -> dict[str, torch.Tensor]:
    if spec.source == "torchvision" and spec.torchvision_weights:
        import torchvision

        weights = torchvision.models.get_weight(spec.torchvision_weights)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        if not os.path.isfile(cached):
            _probe_download(weights.url, spec)
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except OSError as exc:  # URLError, socket timeouts, DNS failures
            raise WeightsDownloadError(f"{spec.name}: {NO_NETWORK_HINT} ({exc})") from exc
    if spec.source == "timm" and spec.timm_name:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        if cfg is None or not (cfg.url or cfg.hf_hub_id):
            raise WeightsError(f"{spec.name}: timm has no pretrained weights for {spec.timm_name!r}")
        if not _timm_cached(cfg):
            if cfg.hf_hub_id and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise WeightsDownloadError(f"{spec.name}: {NO_NETWORK_HINT} (HF_HUB_OFFLINE is set)")
            url = cfg.url if cfg.url else os.environ.get("HF_ENDPOINT", "https://huggingface.co")
            _probe_download(url, spec)  # type: ignore[arg-type]
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, num_classes=1000)
        except OSError as exc:  # URLError; huggingface_hub's LocalEntryNotFoundError is one too
            raise WeightsDownloadError(f"{spec.name}: {NO_NETWORK_HINT} ({exc})") from exc
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    raise WeightsError(f"{spec.name}: no downloadable ImageNet weights are known; pass --pretrained PATH_OR_URI")


def _timm_cached(cfg) -> bool:
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo_id = cfg.hf_hub_id.split("@")[0]
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
    return os.path.isfile(cached)


def _probe_download(url: str, spec: ArchSpec) -> None:
    """Fail within ``PROBE_TIMEOUT_S`` when the download host (or proxy) cannot be reached."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or 80
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise WeightsDownloadError(
            f"{spec.name}: {NO_NETWORK_HINT} (cannot reach {host}:{port}: {exc})"
        ) from exc
