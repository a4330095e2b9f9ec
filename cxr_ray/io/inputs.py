"""Reading one input: the ONE place that turns a URI (or bytes) into a decoded image or a coded error.

Every surface calls :func:`load_input`: training ingest, the screening
stages, ``cxr-ray inspect`` and ``cxr-ray explain``, TensorRT calibration, the
phantom check, report heatmaps and the HTTP endpoint. So a file too large, a
file that cannot be read and a file that does not decode are reported the
same way everywhere: a :class:`~cxr_ray.errors.DecodeError` whose ``code`` is
``read_failed``, ``too_large`` or a decode code, and whose message names the
file by its display name (the base name: directories may carry PHI) and never
quotes what the storage layer said about the path.

New kinds of input (``dicomweb://`` retrieval, say) are added here, behind
the same function, and every surface gets them.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cxr_ray.errors import CxrRayError, DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.storage import expand_inputs, read_bytes
from cxr_ray.io.types import DecodedImage, DecodePolicy

HEADER_ALLOWANCE = 16 << 20  # bytes a file may hold beyond its pixels (DICOM headers, PNG chunks)


def size_limit(policy: DecodePolicy) -> int:
    """Files above this are refused unread: 8 bytes per allowed pixel plus 16 MiB of header."""
    return 8 * policy.max_pixels + HEADER_ALLOWANCE


@dataclass(frozen=True)
class InputPolicy:
    """How an input is read and decoded.

    ``max_bytes``: a larger file is ``too_large`` after reading at most that
    many bytes (None: :func:`size_limit` of ``decode``). ``target_size``: the
    decode hint (the model's input size; None decodes at the stored size).
    ``sha256``: also hash the bytes (training: duplicates, data fingerprint).
    """

    decode: DecodePolicy = field(default_factory=DecodePolicy)
    max_bytes: int | None = None
    target_size: int | None = None
    pseudonym_key: bytes | None = None
    s3_endpoint: str | None = None
    sha256: bool = False

    @property
    def byte_limit(self) -> int:
        return size_limit(self.decode) if self.max_bytes is None else self.max_bytes


@dataclass(frozen=True)
class LoadedInput:
    uri: str
    name: str  # what messages call it
    image: DecodedImage
    nbytes: int
    sha256: str | None = None


def display_name(uri: str) -> str:
    """The file's base name: enough to find it, no directories (they may hold PHI)."""
    return posixpath.basename(str(uri).rstrip("/")) or "input"


def read_error(name: str, exc: BaseException) -> DecodeError:
    """A read failure as ``read_failed`` (our own coded errors pass through unchanged)."""
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, CxrRayError):  # already names the input
        return DecodeError("read_failed", str(exc))
    reason = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = f"{reason}: {exc.strerror}"  # strerror only: the full message repeats the path
    error = DecodeError("read_failed", f"{name}: could not be read ({reason})")
    error.read_exception = type(exc).__name__  # what the storage layer raised, for short reports
    return error


def failure_reason(exc: BaseException) -> str:
    """A short reason without patient data: the decode code, or what a read raised (``FileNotFoundError``)."""
    if isinstance(exc, DecodeError):
        return exc.read_exception or exc.code
    return type(exc).__name__


def listing_error(spec: str, exc: BaseException) -> DecodeError:
    """A spec that could not be listed (missing input, bad glob, unreachable bucket) as ``read_failed``."""
    if isinstance(exc, CxrRayError):  # our listing errors name the spec already
        return DecodeError("read_failed", str(exc))
    return read_error(str(spec), exc)


def read_input(uri: str, policy: InputPolicy, name: str) -> bytes:
    """The input's bytes, at most ``policy.byte_limit`` of them; raises only :class:`DecodeError`."""
    try:
        return read_bytes(uri, s3_endpoint=policy.s3_endpoint, max_bytes=policy.byte_limit)
    except Exception as exc:  # noqa: BLE001 - any read failure is this input's error
        raise read_error(name, exc) from None


def load_input(uri: str, policy: InputPolicy, *, data: bytes | None = None, name: str | None = None) -> LoadedInput:
    """Read (unless ``data`` is given) and decode one input; raises only :class:`DecodeError`.

    ``name``: what messages call the input (default :func:`display_name`; the
    HTTP endpoint passes its request id, never the client's file name).
    """
    name = name or display_name(uri)
    if data is None:
        data = read_input(uri, policy, name)
    digest = hashlib.sha256(data).hexdigest() if policy.sha256 else None
    image = decode_image(
        data, name, policy=policy.decode, pseudonym_key=policy.pseudonym_key, target_size=policy.target_size
    )
    return LoadedInput(uri=uri, name=name, image=image, nbytes=len(data), sha256=digest)


def expand_reporting(specs: Iterable[str], s3_endpoint: str | None = None) -> Iterator[tuple[str, DecodeError | None]]:
    """``(uri, None)`` per input file of ``specs``, and ``(spec, error)`` for a spec that could
    not be listed or matched nothing: a typo is reported, never silently dropped, and the
    other specs go on (``cxr-ray inspect`` and ``cxr-ray explain``)."""
    for spec in specs:
        found = False
        try:
            for uri in expand_inputs(spec, s3_endpoint=s3_endpoint):
                found = True
                yield uri, None
        except Exception as exc:  # noqa: BLE001 - missing input, bad glob, unreachable bucket: report, go on
            yield str(spec), listing_error(spec, exc)
            continue
        if not found:
            yield str(spec), DecodeError("read_failed", f"{spec}: matched no files")
