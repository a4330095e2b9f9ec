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

The actors explain on the CPU (backward passes at full resolution), leaving
GPUs to the predict actors; only flagged rows cost anything.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa

from cxr_ray.errors import DecodeError, UsageError
from cxr_ray.io.storage import is_remote, join
from cxr_ray.io.types import DecodePolicy
from cxr_ray.screen.output import HEATMAPS_DIR
from cxr_ray.screen.schema import HEATMAP_PATH, STATUS_OK
from cxr_ray.screen.stages import display_name

log = logging.getLogger(__name__)

HEATMAP_MODES = ("none", "flagged")


def check_heatmap_mode(mode: str) -> None:
    if mode not in HEATMAP_MODES:
        raise UsageError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {mode!r}")


def check_heatmaps(card, mode: str, method: str) -> None:
    """Refuse, before any work, heatmaps this model cannot have.

    Raises :class:`~cxr_ray.explain.UnsupportedExplanationError` for an
    (architecture, method) pair the explainers do not support, and
    :class:`UsageError` for a model without a positive class (nothing is flagged).
    """
    check_heatmap_mode(mode)
    if mode == "none":
        return
    from cxr_ray.explain.methods import check_supported

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
    from cxr_ray.screen.inputs import path_digests

    return f"{path_digests([path])[0].tobytes().hex()}.{method}"


def stage_arguments(config, output: str, plan, cluster: dict[str, float]) -> dict:
    """``map_batches`` arguments for :class:`HeatmapWriter` (``plan``: the job's :class:`Layout`).

    One to ``plan.actors[1]`` actors, each asking for the CPU share of a
    predict actor on a CPU-only cluster (one CPU on GPU clusters). Where the
    predict actors and a decode task already take every CPU (a one-CPU
    machine), the heatmap actors ask for none: a CPU request there could
    never be met while the other stages hold theirs.
    """
    import ray

    on_gpu = plan.gpus_per_actor > 0
    cpus = 1.0 if on_gpu else plan.cpus_per_actor
    taken = plan.actors[0] * plan.cpus_per_actor + plan.decode_cpus
    if taken + cpus > float(cluster.get("CPU", 1)):
        log.info("heatmap actors ask for no CPU: predict actors and decoding take the cluster's %s", cluster.get("CPU"))
        cpus = 0
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
        },
        "num_cpus": cpus,
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
    ) -> None:
        import torch

        from cxr_ray.explain.methods import Explainer
        from cxr_ray.models.artifact import load_model

        if num_threads:
            torch.set_num_threads(int(num_threads))
        model, card = load_model(artifact, s3_endpoint)
        check_heatmaps(card, "flagged", method)
        self.card = card
        self.method = method
        self.explainer = Explainer(model, card, method)
        self.target = card.positive_index
        self.heatmaps = heatmaps
        self.policy = policy or DecodePolicy()
        self.max_bytes = max_bytes
        self.s3_endpoint = s3_endpoint

    def write(self, path: str) -> str:
        """Explain one input; returns the overlay's URI (raises on any failure)."""
        from cxr_ray.explain.batch import npy_bytes
        from cxr_ray.explain.overlay import overlay_png_bytes
        from cxr_ray.io.decode import decode_image
        from cxr_ray.io.storage import open_output, read_bytes

        data = read_bytes(path, s3_endpoint=self.s3_endpoint, max_bytes=self.max_bytes)
        pixels = decode_image(data, display_name(path), policy=self.policy).pixels
        del data
        heatmap = self.explainer.explain(pixels, self.target).heatmap
        stem = heatmap_name(path, self.method)
        png_uri = join(self.heatmaps, stem + ".png")
        # The raw map first: a row whose PNG exists always has its .npy too.
        with open_output(join(self.heatmaps, stem + ".npy"), "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(npy_bytes(heatmap))
        with open_output(png_uri, "wb", s3_endpoint=self.s3_endpoint) as handle:
            handle.write(overlay_png_bytes(pixels, heatmap))
        return png_uri

    def __call__(self, table: pa.Table) -> pa.Table:
        status = table.column("status").to_pylist()
        flagged = table.column("flagged").to_pylist()
        paths = table.column("path").to_pylist()
        written = table.column(HEATMAP_PATH).to_pylist()
        warnings = table.column("warnings").to_pylist()
        changed = False
        for i, path in enumerate(paths):
            if status[i] != STATUS_OK or flagged[i] is not True:
                continue
            changed = True
            try:
                written[i] = self.write(path)
            except Exception as exc:  # noqa: BLE001 - one row's heatmap never fails the batch
                written[i] = None
                reason = exc.code if isinstance(exc, DecodeError) else type(exc).__name__
                log.warning("heatmap not written (%s): %s", self.method, reason)  # no file name: it may hold PHI
                warnings[i] = [*(warnings[i] or []), f"heatmap not written ({self.method}): {reason}"]
        if not changed:
            return table
        for name, values in ((HEATMAP_PATH, written), ("warnings", warnings)):
            index = table.schema.get_field_index(name)
            table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
        return table
