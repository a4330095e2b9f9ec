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
from collections.abc import Iterable, Iterator
from typing import Any

from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.errors import DecodeError
from cxr_ray.io.inputs import InputPolicy, expand_reporting, load_input
from cxr_ray.io.types import DecodePolicy, ImageMetadata

META_FIELDS = tuple(f.name for f in dataclasses.fields(ImageMetadata))
RECORD_FIELDS = ("path", "status", "error_code", "error", *META_FIELDS)


def inspect_inputs(
    uris: Iterable[str],
    *,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    policy: DecodePolicy | None = None,
    dicomweb_auth: DicomwebAuth | None = None,
) -> Iterator[dict]:
    """Expand each spec (file, directory, glob, s3:// prefix, manifest, DICOMweb query) and inspect every file."""
    policy = policy or DecodePolicy()
    for uri, error in expand_reporting(uris, s3_endpoint, dicomweb_auth):
        if error is not None:
            yield error_record(uri, error)
        else:
            yield inspect_one(uri, pseudonym_key=pseudonym_key, s3_endpoint=s3_endpoint, policy=policy,
                              dicomweb_auth=dicomweb_auth)


def inspect_one(
    uri: str,
    *,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    policy: DecodePolicy | None = None,
    dicomweb_auth: DicomwebAuth | None = None,
) -> dict:
    """Read and decode one file; never raises for a bad or unreadable file."""
    # Messages name the file, not its directories (folder names may carry PHI);
    # the record's ``path`` says where it is.
    reading = InputPolicy(decode=policy or DecodePolicy(), pseudonym_key=pseudonym_key, s3_endpoint=s3_endpoint,
                          dicomweb_auth=dicomweb_auth)
    try:
        image = load_input(uri, reading).image
    except DecodeError as exc:
        return error_record(uri, exc)
    record: dict[str, Any] = {"path": uri, "status": "ok", "error_code": None, "error": None}
    record.update(image.meta.to_dict())
    return record


def error_record(path: str, error: DecodeError) -> dict:
    record: dict[str, Any] = {"path": path, "status": "error", "error_code": error.code, "error": error.message}
    record.update(dict.fromkeys(META_FIELDS))
    record["warnings"] = []
    return record
