"""Engine files on disk, for every engine: build-once locking, sha256-checked reads, TensorRT plan keys.

Every file an engine loads (the ONNX graph, a TensorRT plan) is read through
:func:`read_verified`, which checks its bytes against the sha256 recorded in
``model.json`` before anything parses them. Builds that several processes may
start at once (an ONNX export into the cache, a TensorRT plan) run under
:func:`file_lock`, and ``model.json`` updates under :func:`card_lock`.

TensorRT plans:

A TensorRT plan only runs on the GPU architecture and TensorRT version that
built it, for the batch range and image size of its optimisation profile. So
plans live in the artifact's ``engines/`` directory under a key naming all of
that, and each is recorded in ``model.json`` with its sha256::

    engines/sm90-trt10.3.0-fp16-b1-32-32-224.plan
    {"file": "engines/sm90-...plan", "key": "sm90-...", "sha256": "...", "onnx_sha256": "...", ...}

Nothing here imports TensorRT: the caching and locking logic is plain Python
so it is tested on machines without a GPU, with a callback standing in for the
builder.

Concurrency: several Ray actors on one node may ask for the same engine at
once. :func:`get_or_build_engine` takes an exclusive ``fcntl.flock`` on
``engines/.lock``; the first caller builds, the others wait on the lock and
then find the recorded engine. Updates of ``model.json`` take a separate,
short-held lock (:func:`card_lock`) so recording an ONNX export never waits
for an engine build.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from cxr_ray.engines.registry import get_engine
from cxr_ray.errors import ArtifactError
from cxr_ray.models.artifact import ENGINES_DIR, load_card, sha256_file, write_card
from cxr_ray.models.card import EngineRecord

PRECISIONS = get_engine("tensorrt").precisions
ENGINE_SUFFIX = ".plan"
LOCK_FILE = ".lock"
CARD_LOCK_FILE = ".model.json.lock"


def compute_capability_tag(capability: tuple[int, int] | str) -> str:
    """``(9, 0)``, ``"9.0"`` or ``"sm90"`` -> ``"sm90"``."""
    if isinstance(capability, str):
        text = capability.strip().lower()
        match = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d+))?", text)
        if not match:
            raise ValueError(f"compute capability {capability!r} is not like (9, 0), '9.0' or 'sm90'")
        if text.startswith("sm"):
            return f"sm{match.group(1)}{match.group(2) or ''}"
        return f"sm{match.group(1)}{match.group(2) or '0'}"
    major, minor = capability
    return f"sm{int(major)}{int(minor)}"


def engine_key(
    *,
    compute_capability: tuple[int, int] | str,
    trt_version: str,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    image_size: int,
) -> str:
    """``{sm}-trt{version}-{precision}-b{min}-{opt}-{max}-{image size}``, e.g. ``sm90-trt10.3.0-fp16-b1-32-32-224``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    version = str(trt_version).strip()
    if not re.fullmatch(r"[0-9A-Za-z.+_]+", version):
        raise ValueError(f"TensorRT version {trt_version!r} has characters not allowed in a file name")
    return (
        f"{compute_capability_tag(compute_capability)}-trt{version}-{precision}"
        f"-b{int(min_batch)}-{int(opt_batch)}-{int(max_batch)}-{int(image_size)}"
    )


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float | None = None, poll: float = 0.1) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if needed); ``timeout`` None waits forever.

    flock locks belong to the open file description, so they exclude other
    processes and other threads of this process alike (each call opens the
    file anew). The lock is released when the block exits or the process dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"could not lock {path} within {timeout} s") from None
                    time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def card_lock(artifact_dir: str | os.PathLike, *, timeout: float | None = 60.0):
    """Lock held while ``model.json`` is read, changed and rewritten."""
    return file_lock(Path(artifact_dir) / CARD_LOCK_FILE, timeout=timeout)


def find_engine(artifact_dir: str | os.PathLike, key: str, *, onnx_sha256: str | None = None) -> EngineRecord | None:
    """The card's record for ``key`` whose file exists (and built from ``onnx_sha256`` if given), or None."""
    root = Path(artifact_dir)
    card = load_card(str(root))
    for record in card.engines:
        if record.get("key") != key:
            continue
        if onnx_sha256 is not None and record.get("onnx_sha256") != onnx_sha256:
            continue
        if (root / record["file"]).is_file():
            return EngineRecord(**record)
    return None


def read_verified(path: str | os.PathLike, sha256: str | None, *, what: str = "file", remedy: str = "") -> bytes:
    """The file's bytes, after checking them against the recorded sha256.

    Raises :class:`ArtifactError` on a mismatch, BEFORE anything parses the
    bytes (a TensorRT plan is executable code for the GPU). The bytes returned
    are the ones hashed, so the file cannot change between the check and the
    load. ``sha256`` None: no record to check against (the caller allows it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: {what} is missing") from exc
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ArtifactError(
                f"{path}: sha256 {actual[:16]}... does not match the recorded {sha256[:16]}...; {remedy}"
            )
    return data


def verify_engine_file(path: str | os.PathLike, sha256: str) -> bytes:
    """A TensorRT plan's bytes, checked against its recorded sha256 (none recorded: refused)."""
    if not sha256:
        raise ArtifactError(f"{path}: no sha256 recorded for this engine; refusing to load it")
    return read_verified(
        path, sha256, what="engine file",
        remedy="the engine was modified or corrupted, refusing to load it (delete it to rebuild)",
    )


def record_engine(artifact_dir: str | os.PathLike, record: EngineRecord) -> None:
    """Add or replace (by key) an engine record in ``model.json``."""
    root = Path(artifact_dir)
    with card_lock(root):
        card = load_card(str(root))
        card.engines = [r for r in card.engines if r.get("key") != record["key"]] + [record]
        write_card(root, card)


def get_or_build_engine(
    artifact_dir: str | os.PathLike,
    key: str,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    onnx_sha256: str | None = None,
    lock_timeout: float | None = None,
) -> tuple[EngineRecord, bool]:
    """The engine recorded under ``key``, building it once if there is none.

    ``build(path)`` writes a plan to ``path`` (a temporary name inside
    ``engines/``) and may return extra fields for the record (precision,
    TensorRT version, verification result...). It runs under the engines lock,
    so on one node only one caller builds; the others wait and then find the
    engine. If ``build`` raises, nothing is recorded and the next caller tries
    again. Returns ``(record, built)``.
    """
    root = Path(artifact_dir)
    found = find_engine(root, key, onnx_sha256=onnx_sha256)
    if found is not None:
        return found, False
    engines = root / ENGINES_DIR
    engines.mkdir(parents=True, exist_ok=True)
    with file_lock(engines / LOCK_FILE, timeout=lock_timeout):
        found = find_engine(root, key, onnx_sha256=onnx_sha256)  # built while we waited
        if found is not None:
            return found, False
        tmp = engines / f".{key}.tmp-{os.getpid()}"
        final = engines / f"{key}{ENGINE_SUFFIX}"
        try:
            extra = build(tmp) or {}
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise ArtifactError(f"engine build for {key} produced no plan at {tmp}")
            record = cast(EngineRecord, {  # the builder's metadata, then what the cache adds
                **extra,
                "file": f"{ENGINES_DIR}/{final.name}",
                "key": key,
                "sha256": sha256_file(tmp),
                "bytes": tmp.stat().st_size,
                "onnx_sha256": onnx_sha256,
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        record_engine(root, record)
        return record, True
