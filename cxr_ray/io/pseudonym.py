"""Keyed pseudonyms for DICOM identifiers.

Outputs may link images of the same patient / study (to split by patient, to
de-duplicate) but must never carry the identifier itself. An HMAC-SHA256 keyed
by a secret the operator supplies gives a stable pseudonym that cannot be
reversed or recomputed from a guessed ID without the key (a plain hash of a
PatientID could be brute-forced from the small space of hospital IDs).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cxr_ray.errors import UsageError


def pseudonymize(value: str, key: bytes) -> str:
    """HMAC-SHA256 of ``value`` (UTF-8) keyed by ``key``, as 64 lowercase hex characters."""
    if not key:
        raise ValueError("pseudonym key must be non-empty bytes")
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonym_or_none(value: object, key: bytes | None) -> str | None:
    """Pseudonym of a DICOM value, or None when there is no key or no value.

    DICOM pads strings with spaces (and UIDs with NUL), so the same ID written by
    two systems may differ only in padding; it is stripped before hashing so that
    both give the same pseudonym.
    """
    if key is None or value is None:
        return None
    text = str(value).strip(" \x00\t\r\n")
    if not text:
        return None
    return pseudonymize(text, key)


def key_from_env(variable: str | None) -> bytes | None:
    """The key named by ``--pseudonym-key-env``: never taken from the command line itself."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise UsageError(
            f"--pseudonym-key-env {variable}: that environment variable is unset or empty; "
            "export the operator's pseudonym key in it (the key itself is never passed on the command line)"
        )
    return value.encode("utf-8")
