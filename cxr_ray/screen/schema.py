"""The screening output's Parquet schema and the status / error-code vocabulary.

One row per input file, whatever happened to it (DESIGN.md "Screening output").
``status`` is decided from the error code alone, so every stage and every
reader agrees on it:

* ``ok``: decoded, preprocessed and predicted;
* ``skipped``: a valid file the decode *policy* refuses on purpose (a lateral
  view, a CT slice, a DICOM object that is not an image, a multi-frame object
  when the policy refuses them). Nothing is wrong with the file; it is simply
  not a frontal chest radiograph this model may screen;
* ``error``: everything else: a file that cannot be read (``read_failed``),
  is broken or unsupported (``truncated``, ``not_an_image``, ``too_large``,
  ``unsupported_transfer_syntax``...), a batch the model failed on
  (``inference_failed``), or an input whose worker kept crashing
  (``worker_crashed``). These deserve an operator's look.

Types are chosen for pandas, DuckDB and Spark alike: strings, int32, float32,
bool, ``timestamp[us, UTC]`` and one ``list<string>`` (``warnings``).
"""

from __future__ import annotations

import re

import pyarrow as pa

from cxr_ray.errors import DECODE_ERROR_CODES

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)

# Decode policy filters: valid inputs deliberately not screened.
SKIP_CODES = frozenset({"lateral_view", "unsupported_modality", "unsupported_sop_class", "multi_frame"})
# Codes the screening job adds to the decode vocabulary.
INFERENCE_FAILED = "inference_failed"
WORKER_CRASHED = "worker_crashed"
SCREEN_ERROR_CODES = frozenset(DECODE_ERROR_CODES | {INFERENCE_FAILED, WORKER_CRASHED})

# Error messages are capped: they name the file (basename) and the problem, never pixel data or PHI.
MAX_ERROR_CHARS = 300


def status_for(error_code: str | None) -> str:
    """``ok`` without a code; ``skipped`` for policy filters; ``error`` otherwise."""
    if error_code is None:
        return STATUS_OK
    return STATUS_SKIPPED if error_code in SKIP_CODES else STATUS_ERROR


def prob_column(class_name: str) -> str:
    """``prob_<class>`` with the class name reduced to ``[a-z0-9_]`` (SQL-friendly)."""
    return "prob_" + re.sub(r"[^a-z0-9_]+", "_", class_name.lower()).strip("_")


def prob_columns(classes: list[str]) -> list[str]:
    names = [prob_column(c) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class names {classes} collide as Parquet columns {names}; rename the classes")
    return names


# Columns the decode stage produces (before the model); also carried to the output.
META_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error", pa.string()),
    pa.field("format", pa.string()),
    pa.field("modality", pa.string()),
    pa.field("view_position", pa.string()),
    pa.field("photometric_interpretation", pa.string()),
    pa.field("manufacturer", pa.string()),  # equipment (DICOM 0008,0070), not patient data
    pa.field("rows", pa.int32()),
    pa.field("cols", pa.int32()),
    pa.field("patient_pseudonym", pa.string()),
    pa.field("study_pseudonym", pa.string()),
    pa.field("instance_pseudonym", pa.string()),
    pa.field("warnings", pa.list_(pa.string())),
]
META_COLUMNS = [f.name for f in META_FIELDS]
# What the output says about each input's header (and the drift check's header mix compares).
HEADER_COLUMNS = ("format", "modality", "view_position", "photometric_interpretation", "manufacturer", "rows", "cols")
PIXELS = "pixels"
# Always in the output (null unless the heatmap stage wrote an overlay), so runs with
# and without heatmaps write one schema and resume into each other.
HEATMAP_PATH = "heatmap_path"


def decoded_schema(image_size: int) -> pa.Schema:
    """Decode-stage blocks: metadata plus the preprocessed image, flattened.

    ``pixels`` is a fixed-size list of ``image_size**2`` float32 (zeros for
    rows that did not decode): plain Arrow, converted to an (N, 1, S, S)
    array without copying (:func:`pixels_array`).
    """
    return pa.schema([*META_FIELDS, pa.field(PIXELS, pa.list_(pa.float32(), image_size * image_size))])


def output_schema(classes: list[str]) -> pa.Schema:
    """The Parquet schema of ``OUTPUT/parts/*.parquet`` for a model with ``classes``."""
    meta = {f.name: f for f in META_FIELDS}
    fields = [meta[name] for name in ("path", "status", "error_code", "error", *HEADER_COLUMNS)]
    fields.append(pa.field("predicted_label", pa.string()))
    fields += [pa.field(name, pa.float32()) for name in prob_columns(classes)]
    fields += [
        pa.field("score", pa.float32()),
        pa.field("flagged", pa.bool_()),
        pa.field(HEATMAP_PATH, pa.string()),  # overlay PNG of a flagged row (--heatmaps flagged), else null
        pa.field("threshold", pa.float32()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("screened_at", pa.timestamp("us", tz="UTC")),
    ]
    fields += [meta[name] for name in ("patient_pseudonym", "study_pseudonym", "instance_pseudonym", "warnings")]
    return pa.schema(fields)


def pixels_array(table: pa.Table, image_size: int):
    """The ``pixels`` column of a decode-stage table as a float32 (N, 1, S, S) numpy array."""
    column = table.column(PIXELS)
    chunk = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = chunk.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return flat.reshape(len(table), 1, image_size, image_size)
