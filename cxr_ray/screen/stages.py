"""The three per-batch callables of the screening pipeline, plain Python.

* :func:`decode_batch` (CPU tasks): path -> bytes -> decoded, preprocessed
  image + metadata. Every failure becomes a row with a code; nothing raises.
* :class:`Predictor` (actor pool): loads ONE backend in ``__init__`` (engines
  are built or loaded there, never pickled) and predicts the ``ok`` rows of
  each batch; error rows pass through untouched. A batch the model fails on is
  retried row by row, and rows that still fail get ``inference_failed``.
* :func:`write_batch` (tasks): one atomic, content-addressed Parquet part per
  batch; returns one small stats row for the driver's progress and checks.

Ray Data calls them; tests call them directly on tiny tables.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from cxr_ray.engines.load import load_backend, resolve_backend_name
from cxr_ray.errors import DecodeError
from cxr_ray.io.inputs import InputPolicy, display_name, load_input
from cxr_ray.io.types import DecodePolicy
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import PreprocessConfig, preprocess
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.schema import (
    HEATMAP_PATH,
    INFERENCE_FAILED,
    MAX_ERROR_CHARS,
    META_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    decoded_schema,
    output_schema,
    pixels_array,
    prob_columns,
    status_for,
)

# Fault injection (unset in normal use; the tests set them in a subprocess):
# * a decode worker whose input path contains CRASH_ON_ENV's value exits the
#   process, as a segfault in a native decoder would, on every attempt;
# * a predict actor exits once, on its first batch, if the file named by
#   KILL_ACTOR_ONCE_ENV does not exist yet (it creates it first): the actor
#   restarts and Ray retries the batch.
CRASH_ON_ENV = "CXR_RAY_CHAOS_CRASH_ON"
KILL_ACTOR_ONCE_ENV = "CXR_RAY_CHAOS_KILL_ACTOR_ONCE"


def _clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def decode_batch(
    table: pa.Table,
    *,
    preprocessing: dict,
    policy: DecodePolicy | None = None,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    max_bytes: int | None = None,
) -> pa.Table:
    """``path`` column -> decode-stage table (:func:`~cxr_ray.screen.schema.decoded_schema`)."""
    config = PreprocessConfig.from_dict(preprocessing)
    size = config.image_size
    reading = InputPolicy(decode=policy or DecodePolicy(), max_bytes=max_bytes, target_size=size,
                          pseudonym_key=pseudonym_key, s3_endpoint=s3_endpoint)
    crash_on = os.environ.get(CRASH_ON_ENV)
    paths = table.column("path").to_pylist()
    columns: dict[str, list] = {name: [] for name in META_COLUMNS}
    pixels = np.zeros((len(paths), size * size), dtype=np.float32)
    for i, path in enumerate(paths):
        if crash_on and crash_on in path:
            os._exit(77)
        name = display_name(path)
        row = dict.fromkeys(META_COLUMNS)
        row["path"] = path
        row["warnings"] = []
        try:
            image = load_input(path, reading, name=name).image
            try:
                pixels[i] = preprocess(image.pixels, config).reshape(-1)
            except Exception as exc:  # noqa: BLE001 - a decoder output preprocess cannot take
                raise DecodeError("corrupt", f"{name}: cannot be preprocessed ({type(exc).__name__})") from None
            row.update({k: v for k, v in image.meta.to_dict().items() if k in META_COLUMNS})
        except DecodeError as exc:
            row["error_code"] = exc.code
            row["error"] = _clip(exc.message)
        except Exception as exc:  # noqa: BLE001 - decode_image promises DecodeError only; belt and braces
            row["error_code"] = "corrupt"
            row["error"] = _clip(f"{name}: could not be decoded ({type(exc).__name__})")
        row["status"] = status_for(row["error_code"])
        for key in META_COLUMNS:
            columns[key].append(row[key])
    schema = decoded_schema(size)
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema if f.name in columns]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), size * size))
    return pa.Table.from_arrays(arrays, schema=schema)


class Predictor:
    """Actor body: one backend per actor; ``__call__`` maps a decode-stage table to output rows."""

    def __init__(
        self,
        artifact: str,
        backend: str = "auto",
        *,
        run_id: str,
        device: str | None = None,
        precision: str = "auto",
        num_threads: int | None = None,
        s3_endpoint: str | None = None,
        decode: dict | None = None,
        tta: int = 1,
    ) -> None:
        """``decode``: :func:`decode_batch`'s keyword arguments when this actor decodes its own
        batches (``path`` tables in), None when a decode stage runs before it."""

        self.card = load_card(artifact, s3_endpoint)
        if backend == "auto" and device != "cpu":
            # On a GPU actor, "auto" without TensorRT means torch on CUDA, not ONNX Runtime on the CPU.
            backend = "tensorrt" if resolve_backend_name("auto", device, precision) == "tensorrt" else "torch"
        self.backend = load_backend(
            artifact, backend, device=device, precision=precision, num_threads=num_threads, s3_endpoint=s3_endpoint,
            tta=tta,
        )
        self.run_id = run_id
        self.image_size = self.card.image_size
        self.classes = list(self.card.classes)
        self.prob_names = prob_columns(self.classes)
        self.threshold = float(self.card.threshold)
        self.schema = output_schema(self.classes)
        self.max_batch = getattr(self.backend.input_spec, "max_batch", None)
        self.decode = decode

    # ------------------------------------------------------------------ inference
    def _predict(self, batch: np.ndarray) -> np.ndarray:
        step = self.max_batch or len(batch)
        out = [np.asarray(self.backend.predict(batch[i : i + step]), dtype=np.float32) for i in range(0, len(batch), step)]
        probs = np.concatenate(out) if out else np.empty((0, len(self.classes)), np.float32)
        if probs.shape != (len(batch), len(self.classes)):
            raise ValueError(f"backend returned shape {probs.shape}, expected {(len(batch), len(self.classes))}")
        return probs

    def predict_rows(self, batch: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Probabilities (N, K) and a per-row failure message (None where it worked).

        The whole batch first; if the model raises, each row alone, so that one
        bad input (or a batch too big for the device) does not fail its neighbours.
        """
        failures: list[str | None] = [None] * len(batch)
        probs = np.full((len(batch), len(self.classes)), np.nan, dtype=np.float32)
        try:
            probs[:] = self._predict(batch)
        except Exception as exc:  # noqa: BLE001 - retried row by row below
            if len(batch) == 1:
                failures[0] = _clip(f"{self.backend.name}: {type(exc).__name__}: {exc}")
            else:
                for i in range(len(batch)):
                    row_probs, row_fail = self.predict_rows(batch[i : i + 1])
                    probs[i], failures[i] = row_probs[0], row_fail[0]
        bad = ~np.isfinite(probs).all(axis=1)
        for i in np.flatnonzero(bad):  # type: ignore[assignment]
            failures[i] = failures[i] or f"{self.backend.name}: non-finite probabilities"
        return probs, failures

    def __call__(self, table: pa.Table) -> pa.Table:
        marker = os.environ.get(KILL_ACTOR_ONCE_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(78)
        if self.decode is not None:
            table = decode_batch(table, **self.decode)
        n = len(table)
        status = table.column("status").to_pylist()
        codes = table.column("error_code").to_pylist()
        errors = table.column("error").to_pylist()
        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        ok = np.flatnonzero(np.asarray(status, dtype=object) == STATUS_OK)
        if len(ok):
            ok_probs, failures = self.predict_rows(pixels_array(table, self.image_size)[ok])
            for j, i in enumerate(ok):
                if failures[j] is None:
                    probs[i] = ok_probs[j]
                else:
                    status[i], codes[i], errors[i] = STATUS_ERROR, INFERENCE_FAILED, failures[j]
        return self._rows(table, status, codes, errors, probs)

    def _rows(self, table: pa.Table, status: list, codes: list, errors: list, probs: np.ndarray) -> pa.Table:
        n = len(table)
        done = np.asarray(status, dtype=object) == STATUS_OK
        columns: dict[str, pa.Array] = {}
        for name in ("path", "format", "modality", "view_position", "rows", "cols"):
            columns[name] = table.column(name)
        columns["status"] = pa.array(status, pa.string())
        columns["error_code"] = pa.array(codes, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        decisions = self.card.decide(probs)
        labels = [label if d else None for label, d in zip(decisions.labels, done, strict=True)]
        columns["predicted_label"] = pa.array(labels, pa.string())
        for k, name in enumerate(self.prob_names):
            columns[name] = pa.array(decisions.probabilities[:, k], pa.float32(), mask=~done)
        if decisions.scores is not None and decisions.flagged is not None:
            columns["score"] = pa.array(decisions.scores, pa.float32(), mask=~done)
            columns["flagged"] = pa.array(decisions.flagged, pa.bool_(), mask=~done)
        else:
            columns["score"] = pa.nulls(n, pa.float32())
            columns["flagged"] = pa.nulls(n, pa.bool_())
        columns[HEATMAP_PATH] = pa.nulls(n, pa.string())  # filled by the heatmap stage, when there is one
        columns["threshold"] = pa.array(np.full(n, self.threshold, np.float32), pa.float32())
        columns["model_name"] = pa.array([self.card.name] * n, pa.string())
        columns["model_version"] = pa.array([self.card.version] * n, pa.string())
        columns["backend"] = pa.array([self.backend.label] * n, pa.string())
        columns["run_id"] = pa.array([self.run_id] * n, pa.string())
        columns["screened_at"] = pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC"))
        for name in ("patient_pseudonym", "study_pseudonym", "instance_pseudonym", "warnings"):
            columns[name] = table.column(name)
        return pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)


WRITE_STATS_SCHEMA = pa.schema(
    [("part", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()),
     ("skipped", pa.int64()), ("flagged", pa.int64()), ("backend", pa.string())]
)


def write_batch(table: pa.Table, *, output: str, s3_endpoint: str | None = None) -> pa.Table:
    """Write one part (sorted by path, atomically, content-addressed); return its stats row."""

    table = table.sort_by("path")
    name = OutputLayout(output, s3_endpoint).write_part(table)
    status = table.column("status").to_numpy(zero_copy_only=False)
    flagged = table.column("flagged").fill_null(False).to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "part": [name],
            "rows": [len(table)],
            "ok": [int((status == "ok").sum())],
            "error": [int((status == "error").sum())],
            "skipped": [int((status == "skipped").sum())],
            "flagged": [int(flagged.sum())],
            "backend": [next((b for b in table.column("backend").to_pylist() if b), None)],
        },
        schema=WRITE_STATS_SCHEMA,
    )
