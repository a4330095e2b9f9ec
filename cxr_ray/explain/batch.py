"""Heatmaps for many inputs (``cxr-ray explain``): one record per input, whatever happens to it."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable, Iterator

import numpy as np

from cxr_ray.errors import DecodeError, UsageError
from cxr_ray.explain.methods import Explainer
from cxr_ray.explain.overlay import DEFAULT_ALPHA, overlay_png_bytes
from cxr_ray.io.inputs import InputPolicy, expand_reporting, load_input
from cxr_ray.io.storage import join, open_output


def _write(uri: str, data: bytes, s3_endpoint: str | None) -> None:
    with open_output(uri, "wb", s3_endpoint=s3_endpoint) as handle:
        handle.write(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


class _Names:
    """Output stems from input file names; a repeated name gets ``-2``, ``-3``... in input order."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    def __call__(self, uri: str) -> str:
        base = posixpath.basename(str(uri).rstrip("/")) or "image"
        stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
        count = self.used.get(stem, 0) + 1
        self.used[stem] = count
        return stem if count == 1 else f"{stem}-{count}"


def explain_inputs(
    model,
    card,
    inputs: Iterable[str],
    out_dir: str,
    *,
    method: str = "gradcam",
    target: str | int | None = None,
    layer: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    s3_endpoint: str | None = None,
) -> Iterator[dict]:
    """Explain every file the input specs name; write ``<stem>.<method>.png`` / ``.npy`` under ``out_dir``.

    Yields ``{path, status: ok, method, class, score, predicted_label, rows, cols, files}`` or
    ``{path, status: error, error_code, error}``; a bad input never stops the run.
    """
    explainer = Explainer(model, card, method, layer=layer)
    if isinstance(target, str) and target not in card.classes:
        raise UsageError(f"--class {target!r} is not one of the model's classes: {', '.join(card.classes)}")
    reading = InputPolicy(s3_endpoint=s3_endpoint)  # the stored size: overlays match the original image
    names = _Names()
    for uri, listing_failure in expand_reporting(inputs, s3_endpoint):
        if listing_failure is not None:
            yield _error(uri, listing_failure)
            continue
        try:
            pixels = load_input(uri, reading).image.pixels
        except DecodeError as exc:  # unreadable or undecodable: reported per file, like screening
            yield _error(uri, exc)
            continue
        result = explainer.explain(pixels, target)
        stem = f"{names(uri)}.{method}"
        png_uri, npy_uri = join(out_dir, stem + ".png"), join(out_dir, stem + ".npy")
        _write(png_uri, overlay_png_bytes(pixels, result.heatmap, alpha=alpha), s3_endpoint)
        _write(npy_uri, npy_bytes(result.heatmap), s3_endpoint)
        yield {
            "path": uri,
            "status": "ok",
            "method": method,
            "layer": result.layer,
            "class": result.target_class,
            "score": result.score,
            "predicted_label": max(result.probabilities, key=result.probabilities.get),  # type: ignore[arg-type]
            "rows": int(pixels.shape[0]),
            "cols": int(pixels.shape[1]),
            "files": {"overlay": png_uri, "heatmap": npy_uri},
        }


def _error(path: str, error: DecodeError) -> dict:
    return {"path": path, "status": "error", "error_code": error.code, "error": error.message}
