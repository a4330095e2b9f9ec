"""The optional heatmap stage of screening (``--heatmaps flagged``): overlays for flagged rows.

An actor pool after the :class:`~cxr_ray.screen.stages.Predictor`. Each actor
loads the torch model and one :class:`~cxr_ray.explain.Explainer` once, in
``__init__``. For every row that is ``ok`` and ``flagged`` it reads the file
again and decodes it at its stored size (the decode stage kept only the
model-sized, preprocessed image), explains the positive class and writes,
under ``OUTPUT/_heatmaps/`` (underscored like ``_runs/``, so that readers
of ``OUTPUT`` as a Parquet dataset skip it)::

    <digest>.<method>.png   the overlay, at the original image size
    <digest>.<method>.npy   the raw heatmap, float32 (H, W) in [0, 1]

``<digest>`` is the BLAKE2b-128 of the input path (the resume set's digest,
:func:`~cxr_ray.screen.inputs.path_digests`), never the file name, which may
carry patient identifiers. A retried batch rewrites the same names. The row's
``heatmap_path`` is the PNG's URI; every other row keeps a null one. A row
that cannot be explained keeps a null ``heatmap_path`` and gets a
``heatmap not written ...`` warning: it never fails its batch.

With ``--dicom-results DIR_OR_DICOMWEB`` too, the same overlay of each
flagged ``ok`` DICOM row is also sent there as a Secondary Capture in the
source's study (:mod:`cxr_ray.dicomnet.sc`), exactly like the SRs
(:class:`~cxr_ray.dicomnet.results.ResultsSink`); one that cannot be built or
stored leaves a ``heatmap capture not stored: <reason>`` warning, and the
PNG and the row stay.

The actors explain on the CPU (backward passes at full resolution), leaving
GPUs to the predict actors; only flagged rows cost anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from cxr_ray.dicomnet.results import ResultsSink, sc_for
from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.errors import UsageError
from cxr_ray.explain.batch import npy_bytes
from cxr_ray.explain.methods import Explainer, check_supported
from cxr_ray.explain.overlay import overlay_rgb, png_bytes
from cxr_ray.io.inputs import InputPolicy, display_name, failure_reason, load_input, read_input
from cxr_ray.io.storage import is_remote, join, open_output
from cxr_ray.io.types import DecodePolicy
from cxr_ray.models.artifact import load_model
from cxr_ray.models.card import ModelCard
from cxr_ray.screen.config import ScreenConfig, check_heatmap_mode
from cxr_ray.screen.dicom_results import SC_NOT_STORED, not_stored_reason
from cxr_ray.screen.inputs import path_digests
from cxr_ray.screen.output import HEATMAPS_DIR
from cxr_ray.screen.resources import Layout, heatmap_actor_cpus
from cxr_ray.screen.schema import HEATMAP_PATH, STATUS_OK

log = logging.getLogger(__name__)

def check_heatmaps(card: ModelCard, mode: str, method: str) -> None:
    """Refuse, before any work, heatmaps this model cannot have.

    Raises :class:`~cxr_ray.explain.UnsupportedExplanationError` for an
    (architecture, method) pair the explainers do not support, and
    :class:`UsageError` for a model without a positive class (nothing is flagged).
    """
    check_heatmap_mode(mode)
    if mode == "none":
        return

    check_supported(card.arch, method)
    if card.positive_index is None:
        raise UsageError(
            f"--heatmaps {mode} explains flagged rows, but model {card.name!r} has no positive class "
            f"(classes: {', '.join(card.classes)}), so no row is ever flagged"
        )


def heatmaps_uri(output: str) -> str:
    """``OUTPUT/_heatmaps``; a local output is made absolute here, in the driver, so the
    recorded paths do not depend on the working directory of the actors that write them."""
    root = output if is_remote(output) else os.path.abspath(os.path.expanduser(output))
    return join(root, HEATMAPS_DIR)


def heatmap_name(path: str, method: str) -> str:
    """``<BLAKE2b-128 of the input path>.<method>``: stable, and no part of the file name."""

    return f"{path_digests([path])[0].tobytes().hex()}.{method}"


def stage_arguments(config: ScreenConfig, output: str, plan: Layout, cluster: dict[str, float],
                    dicomweb_auth: DicomwebAuth | None = None) -> dict[str, Any]:
    """``map_batches`` arguments for :class:`HeatmapWriter` (``plan``: the job's :class:`Layout`):
    one to ``plan.actors[1]`` actors of :func:`~cxr_ray.screen.resources.heatmap_actor_cpus` each."""
    return {
        "batch_size": config.batch_size,
        "batch_format": "pyarrow",
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.actors[1])),
        "fn_constructor_kwargs": {
            "artifact": config.model,
            "method": config.heatmap_method,
            "heatmaps": heatmaps_uri(output),
            "policy": config.policy,
            "max_bytes": config.max_file_bytes,
            "num_threads": plan.threads_per_actor,
            "s3_endpoint": config.s3_endpoint,
            "dicomweb_auth": dicomweb_auth,
            "dicom_results": config.dicom_results,
        },
        "num_cpus": heatmap_actor_cpus(plan, cluster),
        "max_restarts": -1,
        "max_task_retries": config.max_task_retries,
    }


class HeatmapWriter:
    """Actor body: ``__call__`` maps output rows to the same rows with ``heatmap_path`` filled
    for the flagged ``ok`` ones (see the module docstring)."""

    def __init__(
        self,
        artifact: str,
        method: str = "gradcam",
        *,
        heatmaps: str,
        policy: DecodePolicy | None = None,
        max_bytes: int | None = None,
        num_threads: int | None = None,
        s3_endpoint: str | None = None,
        dicomweb_auth: DicomwebAuth | None = None,
        dicom_results: str | None = None,
    ) -> None:

        if num_threads:
            torch.set_num_threads(int(num_threads))
        model, card = load_model(artifact, s3_endpoint)
        check_heatmaps(card, "flagged", method)
        self.card = card
        self.method = method
        self.explainer = Explainer(model, card, method)
        self.target = card.positive_index
        self.heatmaps = heatmaps
        # The stored size: overlays are drawn on the original image.
        self.reading = InputPolicy(decode=policy or DecodePolicy(), max_bytes=max_bytes, s3_endpoint=s3_endpoint,
                                   dicomweb_auth=dicomweb_auth)
        self.s3_endpoint = s3_endpoint
        self.sink = ResultsSink(dicom_results, dicomweb_auth=dicomweb_auth,
                                s3_endpoint=s3_endpoint) if dicom_results else None

    def write(self, path: str) -> tuple[str, bytes, np.ndarray]:
        """Explain one input; returns the overlay's URI, the input's bytes and the overlay (raises on any failure)."""

        data = read_input(path, self.reading, display_name(path))
        pixels = load_input(path, self.reading, data=data).image.pixels
        heatmap = self.explainer.explain(pixels, self.target).heatmap
        rgb = overlay_rgb(pixels, heatmap)
        stem = heatmap_name(path, self.method)
        png_uri = join(self.heatmaps, stem + ".png")
        # The raw map first: a row whose PNG exists always has its .npy too.
        with open_output(join(self.heatmaps, stem + ".npy"), "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(npy_bytes(heatmap))
        with open_output(png_uri, "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(png_bytes(rgb))
        return png_uri, data, rgb

    def send_capture(self, row: dict, data: bytes, rgb: np.ndarray) -> str | None:
        """Send the overlay of a DICOM row as a Secondary Capture; a warning when it failed, else None."""
        if self.sink is None or row.get("format") != "dicom":
            return None
        try:
            self.sink.send(sc_for(data, rgb, row, self.method))
        except Exception as exc:  # noqa: BLE001 - one row's SC never fails the batch or loses the row
            reason = not_stored_reason(exc)
            log.warning("%s: %s", SC_NOT_STORED, reason)  # no file name: it may hold PHI
            return f"{SC_NOT_STORED}: {reason}"
        return None

    def __call__(self, table: pa.Table) -> pa.Table:
        status = table.column("status").to_pylist()
        flagged = table.column("flagged").to_pylist()
        paths = table.column("path").to_pylist()
        written = table.column(HEATMAP_PATH).to_pylist()
        warnings = table.column("warnings").to_pylist()
        rows = table.to_pylist() if self.sink is not None else None  # the SC's values: the row's own
        changed = False
        for i, path in enumerate(paths):
            if status[i] != STATUS_OK or flagged[i] is not True:
                continue
            changed = True
            try:
                written[i], data, rgb = self.write(path)
                failed = self.send_capture(rows[i], data, rgb) if rows is not None else None
                if failed:
                    warnings[i] = [*(warnings[i] or []), failed]
            except Exception as exc:  # noqa: BLE001 - one row's heatmap never fails the batch
                written[i] = None
                reason = failure_reason(exc)
                log.warning("heatmap not written (%s): %s", self.method, reason)  # no file name: it may hold PHI
                warnings[i] = [*(warnings[i] or []), f"heatmap not written ({self.method}): {reason}"]
        if not changed:
            return table
        for name, values in ((HEATMAP_PATH, written), ("warnings", warnings)):
            index = table.schema.get_field_index(name)
            table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
        return table
