"""Where results as DICOM go (``--dicom-results``): a folder / prefix, or a PACS by STOW-RS.

* ``dicomweb://HOST[:PORT]/PATH`` (or ``dicomweb+https://``): STOW-RS to that
  service (credentials: the same ``--dicomweb-*-env`` variables as inputs);
* anything else is a local directory or an ``s3://`` prefix: each object is
  written as ``<SOP Instance UID>.dcm``, atomically. The UIDs are derived
  from the source instance (:func:`cxr_ray.dicomnet.sr.derived_uid`), so a
  rewrite replaces, never duplicates.

:func:`result_for_row` turns one screening row and its source header into
the SR: the one rule both the screening job and the HTTP endpoint use;
:func:`sc_for` does the same for a heatmap overlay's Secondary Capture.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pydicom

from cxr_ray.dicomnet.sc import build_sc
from cxr_ray.dicomnet.sr import Result, build_sr
from cxr_ray.dicomnet.web import DicomwebAuth, is_dicomweb, parse, store_instances
from cxr_ray.io.storage import join, open_output


def part10(dataset: pydicom.Dataset) -> bytes:
    """``dataset`` as DICOM Part-10 bytes (preamble, ``DICM``, file meta)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class ResultsSink:
    """Sends result objects to one destination; raises (a typed error or the storage's) on failure."""

    def __init__(self, target: str, *, dicomweb_auth: DicomwebAuth | None = None,
                 s3_endpoint: str | None = None) -> None:
        if is_dicomweb(target):
            parse(target)  # a UsageError now, not per instance
        self.target = target
        self.auth = dicomweb_auth
        self.s3_endpoint = s3_endpoint

    def send(self, dataset: pydicom.Dataset) -> str:
        """Store one object; returns where it went (URI)."""
        if is_dicomweb(self.target):
            store_instances(self.target, [dataset], self.auth)
            return parse(self.target).service
        uri = join(self.target, f"{dataset.SOPInstanceUID}.dcm")
        with open_output(uri, "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(part10(dataset))
        return uri


def result_for_row(row: Mapping[str, Any], positive_class: str | None = None) -> Result:
    """The SR's content from a screening row (``predicted_label``, ``score``, ``threshold``, ...)."""
    flagged = row.get("flagged")
    score = row.get("score")
    return Result(
        predicted_label=str(row["predicted_label"]),
        score=None if score is None else float(score),
        threshold=float(row["threshold"]),
        flagged=None if flagged is None else bool(flagged),
        model_name=str(row["model_name"]),
        model_version=str(row["model_version"]),
        positive_class=positive_class,
    )


def header_of(data: bytes) -> pydicom.Dataset:
    """The header of a DICOM input (``data``: its Part-10 bytes), pixels not parsed."""
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def sr_for(data: bytes, row: Mapping[str, Any]) -> pydicom.Dataset:
    """The Comprehensive SR for one screened DICOM input (``data``: its Part-10 bytes)."""
    return build_sr(header_of(data), result_for_row(row))


def sc_for(data: bytes, rgb: np.ndarray, row: Mapping[str, Any], method: str) -> pydicom.Dataset:
    """The Secondary Capture of one screened DICOM input's heatmap overlay (``rgb``: uint8 H x W x 3)."""
    return build_sc(header_of(data), rgb, result_for_row(row), method)
