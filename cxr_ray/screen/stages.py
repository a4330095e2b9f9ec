"""The three per-batch callables of the screening pipeline, plain Python.

* :func:`decode_batch` (CPU tasks): path -> bytes -> decoded, preprocessed
  image + metadata. Every failure becomes a row with a code; nothing raises.
* :class:`Predictor` (actor pool): loads ONE backend in ``__init__`` (engines
  are built or loaded there, never pickled) and predicts the ``ok`` rows of
  each batch; error rows pass through untouched. With ``decode_on="gpu"`` it
  decodes its own batches on its GPU (:mod:`~cxr_ray.screen.device_decode`). A batch the model fails on is
  retried row by row, and rows that still fail get ``inference_failed``.
* :func:`write_batch` (tasks): one atomic, content-addressed Parquet part per
  batch; returns one small stats row for the driver's progress and checks.

Ray Data calls them; tests call them directly on tiny tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.engines.load import load_backend
from cxr_ray.errors import DecodeError
from cxr_ray.io.deadline import process_backstop
from cxr_ray.io.gpu.decode import CPU_NOTE, open_gpu_decoder
from cxr_ray.io.inputs import InputPolicy, display_name, load_input
from cxr_ray.io.types import DecodePolicy
from cxr_ray.models.artifact import load_card
from cxr_ray.preprocess import PreprocessConfig, preprocess
from cxr_ray.screen.device_decode import decode_on_device
from cxr_ray.screen.metrics import record_stage, record_written, timed_stage
from cxr_ray.screen.output import OutputLayout
from cxr_ray.screen.schema import (
    HEADER_COLUMNS,
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


def _reading(decode: dict) -> InputPolicy:
    """How :func:`decode_batch` (given ``decode``, its keyword arguments) reads and decodes."""
    size = PreprocessConfig.from_dict(decode["preprocessing"]).image_size
    return InputPolicy(decode=decode.get("policy") or DecodePolicy(), max_bytes=decode.get("max_bytes"),
                       target_size=size, pseudonym_key=decode.get("pseudonym_key"), s3_endpoint=decode.get("s3_endpoint"),
                       dicomweb_auth=decode.get("dicomweb_auth"))


def _cuda_of(backend: object) -> torch.device | None:
    """The backend's CUDA device, to decode on the same GPU (None: the current one)."""
    device = getattr(backend, "device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


def decode_batch(
    table: pa.Table,
    *,
    preprocessing: dict,
    policy: DecodePolicy | None = None,
    pseudonym_key: bytes | None = None,
    s3_endpoint: str | None = None,
    max_bytes: int | None = None,
    dicomweb_auth: DicomwebAuth | None = None,
) -> pa.Table:
    """``path`` column -> decode-stage table (:func:`~cxr_ray.screen.schema.decoded_schema`)."""
    config = PreprocessConfig.from_dict(preprocessing)
    size = config.image_size
    reading = _reading({"preprocessing": preprocessing, "policy": policy, "pseudonym_key": pseudonym_key,
                        "s3_endpoint": s3_endpoint, "max_bytes": max_bytes, "dicomweb_auth": dicomweb_auth})
    crash_on = os.environ.get(CRASH_ON_ENV)
    paths = table.column("path").to_pylist()
    start = time.perf_counter()
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
            with process_backstop(reading.decode.max_decode_seconds):  # a decoder that froze the GIL too
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
    record_stage("decode", len(paths), time.perf_counter() - start)
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
        decode_on: str = "cpu",
        engine_options: dict[str, Any] | None = None,
        output: str | None = None,
    ) -> None:
        """``decode``: :func:`decode_batch`'s keyword arguments when this actor decodes its own
        batches (``path`` tables in), None when a decode stage runs before it. ``decode_on``:
        ``--decode`` (``gpu``: on this actor's GPU, refused at start where it cannot; ``auto``:
        there when it can, else on the CPU with the reason in each row's warnings). ``engine_options``:
        the run's "engine" flags (:meth:`ScreenConfig.engine_options`), passed unchanged to ``load_backend``.
        ``output``: the run's output prefix, where the engine loaded (and its check) is recorded for the summary."""

        self.card = load_card(artifact, s3_endpoint)
        # "auto" on a GPU actor is the registry's GPU order (TensorRT, ..., torch on CUDA), never the CPU's.
        self.backend = load_backend(
            artifact, backend, device=device, precision=precision, num_threads=num_threads, s3_endpoint=s3_endpoint,
            tta=tta, **(engine_options or {}),
        )
        if output is not None:  # which engine ran, and its load-time check: the summary's "engines"
            OutputLayout(output, s3_endpoint).write_engine(run_id, self.backend.describe())
        self.run_id = run_id
        self.image_size = self.card.image_size
        self.classes = list(self.card.classes)
        self.prob_names = prob_columns(self.classes)
        self.threshold = float(self.card.threshold)
        self.schema = output_schema(self.classes)
        self.max_batch = getattr(self.backend.input_spec, "max_batch", None)
        self.decode = decode
        self.gpu_decoder, self.cpu_note = None, None
        if decode is not None:
            self.gpu_decoder, why = open_gpu_decoder(decode_on, _reading(decode), _cuda_of(self.backend))
            self.cpu_note = None if why is None else CPU_NOTE + why

    # ------------------------------------------------------------------ inference
    def _predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        step = self.max_batch or len(batch)
        run: Callable[[Any], np.ndarray] = (
            self.backend.predict_tensor if isinstance(batch, torch.Tensor) else self.backend.predict)
        out = [np.asarray(run(batch[i : i + step]), dtype=np.float32) for i in range(0, len(batch), step)]
        probs = np.concatenate(out) if out else np.empty((0, len(self.classes)), np.float32)
        if probs.shape != (len(batch), len(self.classes)):
            raise ValueError(f"backend returned shape {probs.shape}, expected {(len(batch), len(self.classes))}")
        return probs

    def predict_rows(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, list[str | None]]:
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
        table, images = self._decoded(table)
        n = len(table)
        status = table.column("status").to_pylist()
        codes = table.column("error_code").to_pylist()
        errors = table.column("error").to_pylist()
        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        ok = np.flatnonzero(np.asarray(status, dtype=object) == STATUS_OK)
        if len(ok):
            with timed_stage("predict", len(ok)):
                ok_probs, failures = self.predict_rows(images(ok))
            for j, i in enumerate(ok):
                if failures[j] is None:
                    probs[i] = ok_probs[j]
                else:
                    status[i], codes[i], errors[i] = STATUS_ERROR, INFERENCE_FAILED, failures[j]
        return self._rows(table, status, codes, errors, probs)

    def _decoded(self, table: pa.Table) -> tuple[pa.Table, Callable[[np.ndarray], np.ndarray | torch.Tensor]]:
        """The decode-stage table and how to get the model inputs of some of its rows."""
        if self.gpu_decoder is not None:
            assert self.decode is not None
            with timed_stage("decode", len(table)):
                table, on_device = decode_on_device(table, self.gpu_decoder, self.decode["preprocessing"])
            return table, lambda rows: on_device[torch.from_numpy(rows).to(on_device.device)]
        if self.decode is not None:
            table = decode_batch(table, **self.decode)
            if self.cpu_note is not None:  # --decode auto, and this actor cannot decode on a GPU
                notes = [[*(w or []), self.cpu_note] for w in table.column("warnings").to_pylist()]
                table = table.set_column(table.schema.get_field_index("warnings"), "warnings",
                                         pa.array(notes, pa.list_(pa.string())))
        return table, lambda rows: pixels_array(table, self.image_size)[rows]

    def _rows(self, table: pa.Table, status: list, codes: list, errors: list, probs: np.ndarray) -> pa.Table:
        n = len(table)
        done = np.asarray(status, dtype=object) == STATUS_OK
        columns: dict[str, pa.Array] = {}
        for name in ("path", *HEADER_COLUMNS):
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
    with timed_stage("write", len(table)):
        name = OutputLayout(output, s3_endpoint).write_part(table)
    record_written(table)
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
