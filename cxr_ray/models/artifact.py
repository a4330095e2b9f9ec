"""The model artifact: one directory (local or s3://) every surface loads unchanged.

Layout::

    model.safetensors   weights (no pickle)
    model.json          the model card: arch, classes, preprocessing, thresholds, metrics...
    model.onnx          optional, written by ``cxr-ray export --format onnx``
    engines/            optional TensorRT plans, each recorded in model.json with its sha256

``version`` is a content hash of the weights and of everything in the card that
changes what the model outputs (arch, classes, preprocessing, thresholds, calibration, ensembling), so
two artifacts with the same version screen identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from cxr_ray.errors import ArtifactError
from cxr_ray.io.storage import get_filesystem
from cxr_ray.models.card import ModelCard
from cxr_ray.models.ensemble import build_network

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
ENGINES_DIR = "engines"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_version(weights_path: Path, card: ModelCard) -> str:
    behaviour = {
        "arch": card.arch,
        "classes": card.classes,
        "positive_class": card.positive_class,
        "preprocessing": card.preprocessing,
        "thresholds": card.thresholds,
    }
    # calibration and ensembling change the probabilities; older cards hash as before
    for key in ("calibration", "ensemble"):
        if getattr(card, key):
            behaviour[key] = getattr(card, key)
    digest = hashlib.sha256(sha256_file(weights_path).encode())
    digest.update(json.dumps(behaviour, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_artifact(directory: str | os.PathLike, model: nn.Module, card: ModelCard) -> ModelCard:
    """Write weights + card into a local directory; fills ``version`` and ``created_at``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_path = out / WEIGHTS_FILE
    save_file(state, str(weights_path), metadata={"arch": card.arch})
    card.version = _content_version(weights_path, card)
    card.created_at = card.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_card(out, card)
    return card


def write_card(directory: str | os.PathLike, card: ModelCard) -> None:
    """Atomically rewrite ``model.json`` (export adds ONNX / engine records to it)."""
    out = Path(directory)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.json.")
    with os.fdopen(fd, "w") as handle:
        handle.write(card.to_json())
    os.replace(tmp, out / CARD_FILE)


def cache_root() -> Path:
    """``$CXR_RAY_CACHE`` (default ``~/.cache/cxr-ray``): local copies of remote artifacts, ONNX exports."""
    return Path(os.environ.get("CXR_RAY_CACHE", Path.home() / ".cache" / "cxr-ray"))


def localize(uri: str, s3_endpoint: str | None = None) -> Path:
    """A local directory holding the artifact: the path itself, or a cached copy of s3://.

    Backends need real files (ONNX Runtime, TensorRT), so remote artifacts are
    copied once into ``$CXR_RAY_CACHE`` (default ``~/.cache/cxr-ray``) keyed by
    the URI and the card's version.
    """
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser().resolve()
        if not (path / CARD_FILE).is_file():
            raise ArtifactError(f"{uri}: not a model artifact (no {CARD_FILE})")
        return path
    fs, root = get_filesystem(uri, s3_endpoint=s3_endpoint)
    try:
        card = ModelCard.from_dict(json.loads(fs.cat_file(f"{root.rstrip('/')}/{CARD_FILE}")))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri}: not a model artifact (no {CARD_FILE})") from exc
    cache = cache_root()
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    local = cache / "artifacts" / f"{key}-{card.version}"
    if not (local / CARD_FILE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache))
        fs.get(root.rstrip("/") + "/", str(staging), recursive=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        if not (local / CARD_FILE).is_file():
            shutil.move(str(staging), str(local))
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return local


def load_card(uri: str, s3_endpoint: str | None = None) -> ModelCard:
    path = localize(uri, s3_endpoint)
    try:
        return ModelCard.from_dict(json.loads((path / CARD_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{uri}: {CARD_FILE} is malformed: {exc}") from exc


def verify_artifact(uri: str, s3_endpoint: str | None = None) -> ModelCard:
    """The card, once the artifact is known whole: weights present and matching the card's version.

    The driver calls this before any actor starts, so a broken artifact is one
    clear error instead of every actor failing on it in turn.
    """
    path = localize(uri, s3_endpoint)
    card = load_card(str(path))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} is missing; point --model at a directory `cxr-ray train` wrote")
    if card.version and _content_version(weights, card) != card.version:
        raise ArtifactError(
            f"{uri}: {WEIGHTS_FILE} or the card's thresholds/classes changed since version {card.version} was "
            "recorded; re-create the artifact (cxr-ray train) rather than editing it"
        )
    return card


def network_for(card: ModelCard) -> nn.Module:
    """A randomly initialised network of the card's shape: one model, or a fold ensemble of them."""
    return build_network(card.arch, len(card.classes), ensemble_temperatures(card))


def ensemble_temperatures(card: ModelCard) -> list[float] | None:
    """The members' temperatures of a fold-ensemble card (None for one model)."""
    if not card.ensemble:
        return None
    return [float(t) for t in card.ensemble.get("temperatures") or [1.0] * int(card.ensemble["members"])]


def load_model(uri: str, s3_endpoint: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from the registry and load its safetensors weights (eval mode, CPU)."""
    path = localize(uri, s3_endpoint)
    card = load_card(str(path))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} is missing")
    model = network_for(card)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{uri}: weights do not match arch {card.arch!r} with {len(card.classes)} classes: {exc}") from exc
    return model.eval(), card
