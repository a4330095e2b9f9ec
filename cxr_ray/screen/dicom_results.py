"""The optional results-as-DICOM stage of screening (``--dicom-results DIR_OR_DICOMWEB``).

Tasks after the predict (and heatmap) stage. For each row that is ``ok`` and
came from a DICOM input, the source is read again (its header only is
parsed: the decode stage kept no header, and the SR needs the patient and
study attributes, which the rows never hold), a Comprehensive SR is built
from the row's own values (:mod:`cxr_ray.dicomnet.sr`) and sent to the
destination (:class:`cxr_ray.dicomnet.results.ResultsSink`).

A row whose SR could not be built or stored keeps its row, with a warning
``dicom result not stored: <reason>`` (the reason is an error type or code,
never a header value); the run summary counts them. Rows that are not ``ok``
(a failed decode) get no SR. With ``--heatmaps flagged``, the heatmap stage
sends each flagged row's overlay as a Secondary Capture to the same
destination, with its own warning (:data:`SC_NOT_STORED`) and count.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from cxr_ray.dicomnet.results import ResultsSink, sr_for
from cxr_ray.dicomnet.web import DicomwebAuth, DicomwebError
from cxr_ray.io.inputs import InputPolicy, display_name, failure_reason, read_input
from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.schema import STATUS_OK

log = logging.getLogger(__name__)
NOT_STORED = "dicom result not stored"
SC_NOT_STORED = "heatmap capture not stored"  # the Secondary Capture (cxr_ray.screen.heatmaps)


def stage_arguments(config: ScreenConfig, dicomweb_auth: DicomwebAuth | None) -> dict[str, Any]:
    """``map_batches`` arguments for :func:`write_dicom_results`."""
    return {
        "batch_size": config.batch_size,
        "batch_format": "pyarrow",
        "fn_kwargs": {"target": config.dicom_results, "max_bytes": config.max_file_bytes,
                      "s3_endpoint": config.s3_endpoint, "dicomweb_auth": dicomweb_auth},
        "num_cpus": 0.25,  # I/O bound: a read and a store per row
        "max_retries": config.max_task_retries,
    }


def write_dicom_results(table: pa.Table, *, target: str, max_bytes: int | None = None,
                        s3_endpoint: str | None = None, dicomweb_auth: DicomwebAuth | None = None) -> pa.Table:
    """Send an SR per ``ok`` DICOM row; the same rows come back, warnings added where one failed."""
    sink = ResultsSink(target, dicomweb_auth=dicomweb_auth, s3_endpoint=s3_endpoint)
    reading = InputPolicy(max_bytes=max_bytes, s3_endpoint=s3_endpoint, dicomweb_auth=dicomweb_auth)
    rows = table.to_pylist()
    warnings = table.column("warnings").to_pylist()
    changed = False
    for i, row in enumerate(rows):
        if row["status"] != STATUS_OK or row.get("format") != "dicom":
            continue
        try:
            sink.send(sr_for(read_input(row["path"], reading, display_name(row["path"])), row))
        except Exception as exc:  # noqa: BLE001 - one row's SR never fails the batch or loses rows
            reason = not_stored_reason(exc)
            log.warning("%s: %s", NOT_STORED, reason)
            warnings[i] = [*(warnings[i] or []), f"{NOT_STORED}: {reason}"]
            changed = True
    if not changed:
        return table
    index = table.schema.get_field_index("warnings")
    return table.set_column(index, table.schema.field(index), pa.array(warnings, table.schema.field(index).type))


def not_stored_reason(exc: BaseException) -> str:
    """Why an object was not stored, naming no patient: a STOW-RS status, an error code or type."""
    return str(exc) if isinstance(exc, DicomwebError) else failure_reason(exc)


def count_not_stored(warnings: list[list[str] | None], prefix: str = NOT_STORED) -> int:
    return sum(1 for w in warnings if any(str(x).startswith(prefix) for x in (w or [])))
