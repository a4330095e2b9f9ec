"""Typed errors shared by every layer.

Each error carries a stable machine-readable ``code`` so that the screening
job, the HTTP endpoint and ``cxr-ray inspect`` report the same thing for the
same bad input. Messages name the input and what is wrong, never patient data.
"""

from __future__ import annotations

from typing import Any

# Stable decode error codes (DESIGN.md "Decode" contract). Screening writes them
# into the Parquet ``error_code`` column and the endpoint returns them in 422s.
DECODE_ERROR_CODES = frozenset(
    {
        "empty",
        "not_an_image",
        "truncated",
        "no_pixel_data",
        "unsupported_sop_class",
        "unsupported_modality",
        "lateral_view",
        "multi_frame",
        "too_large",
        "unsupported_transfer_syntax",
        "unsupported_photometric",
        "corrupt",
        "read_failed",
        "timeout",
    }
)


class CxrRayError(Exception):
    """Base class for every error this package raises on purpose."""


class UsageError(CxrRayError):
    """A command was called with arguments that cannot work (exit status 2)."""


class DecodeError(CxrRayError):
    """One input could not be turned into an image; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        if code not in DECODE_ERROR_CODES:
            raise ValueError(f"unknown decode error code {code!r}; valid: {sorted(DECODE_ERROR_CODES)}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.read_exception: str | None = None  # set for read_failed: what the storage layer raised

    def __reduce__(self) -> tuple[Any, ...]:  # keep code + message across Ray's pickling of task errors
        return (type(self), (self.code, self.message), {"read_exception": self.read_exception})


class ArtifactError(CxrRayError):
    """A model artifact is missing, malformed or fails an integrity check."""


class BackendUnavailableError(CxrRayError):
    """An inference backend cannot run here (missing package or device)."""
