"""``cxr-ray inspect``: what decode makes of each input, one record per file.

Every file yields exactly one record, whatever happens to it, with the same
keys in the same order: ``path``, ``status`` (ok | error), ``error_code``,
``error``, then every :class:`~cxr_ray.io.types.ImageMetadata` field (None on
errors). A spec that names nothing also yields one error record
(``read_failed``), so a typo never vanishes silently. Identifiers appear only
as keyed pseudonyms, and only when a key is given.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Iterator

from cxr_ray.errors import CxrRayError, DecodeError
from cxr_ray.io.decode import decode_image
from cxr_ray.io.storage import expand_inputs, read_bytes
from cxr_ray.io.types import DecodePolicy, ImageMetadata

META_FIELDS = tuple(f.name for f in dataclasses.fields(ImageMetadata))
RECORD_FIELDS = ("path", "status", "error_code", "error", *META_FIELDS)


def max_file_bytes(policy: DecodePolicy) -> int:
    """Files above this are refused unread: 8 bytes per allowed pixel plus 16 MiB of header."""
    return 8 * policy.max_pixels + (16 << 20)


def inspect_inputs(
    uris: Iterable[str],
    *,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    policy: DecodePolicy | None = None,
) -> Iterator[dict]:
    """Expand each spec (file, directory, glob, s3:// prefix, manifest) and inspect every file."""
    policy = policy or DecodePolicy()
    for spec in uris:
        found = False
        try:
            for uri in expand_inputs(spec, s3_endpoint=s3_endpoint):
                found = True
                yield inspect_one(
                    uri, pseudonym_key=pseudonym_key, s3_endpoint=s3_endpoint, policy=policy
                )
        except Exception as exc:  # missing input, bad glob, unreachable bucket: report, go on
            yield error_record(str(spec), DecodeError("read_failed", _reason(spec, exc)))
            continue
        if not found:
            yield error_record(str(spec), DecodeError("read_failed", f"{spec}: matched no files"))


def inspect_one(
    uri: str,
    *,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    policy: DecodePolicy | None = None,
) -> dict:
    """Read and decode one file; never raises for a bad or unreadable file."""
    policy = policy or DecodePolicy()
    # Messages name the file, not its directories (folder names may carry PHI);
    # the record's ``path`` says where it is.
    name = posixpath.basename(str(uri).rstrip("/")) or str(uri)
    try:
        data = read_bytes(uri, s3_endpoint=s3_endpoint, max_bytes=max_file_bytes(policy))
    except DecodeError as exc:
        return error_record(uri, exc)
    except Exception as exc:
        return error_record(uri, DecodeError("read_failed", _reason(name, exc)))
    try:
        image = decode_image(data, name, policy=policy, pseudonym_key=pseudonym_key)
    except DecodeError as exc:
        return error_record(uri, exc)
    record = {"path": uri, "status": "ok", "error_code": None, "error": None}
    record.update(image.meta.to_dict())
    return record


def error_record(path: str, error: DecodeError) -> dict:
    record = {"path": path, "status": "error", "error_code": error.code, "error": error.message}
    record.update(dict.fromkeys(META_FIELDS))
    record["warnings"] = []
    return record


def _reason(name: object, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{name}: cannot be read ({exc.strerror})"
    if isinstance(exc, CxrRayError):  # our own errors already name the input
        return str(exc)
    detail = str(exc)
    return f"{name}: cannot be read ({type(exc).__name__}{': ' + detail if detail else ''})"
