"""Does the heatmap point at the lesion? Objective scores against phantom lesion masks.

Two standard measures, both computed at the original image size:

energy ratio
    share of the heatmap's mass inside the lesion mask divided by the mask's
    share of the image area. A map that ignores the lesion scores 0, a uniform
    (or random) map 1.0 (chance), a map entirely inside the mask
    ``area / mask_area``.
pointing game (Zhang et al., "Top-down neural attention by excitation
backprop", 2016)
    a hit when the heatmap's maximum lies inside the mask. Reported strictly
    (no tolerance) and with a tolerance: the mask dilated by
    ``tolerance`` x the image's shorter side (default 4 %: 4 px on the
    104 x 128 phantoms, 20 px at 512 px; Zhang et al. used 15 px on PASCAL
    VOC images of ~375-500 px).
    Chance is the mask's area share (reported alongside as ``chance_pointing``).

:func:`localisation_report` runs both over a labelled archive in the
``cxr_ray.synth`` layout (``labels.csv`` with ``path,label,mask_path,...``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cxr_ray.errors import DecodeError
from cxr_ray.explain.methods import METHODS, Explainer, supported_pairs
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.storage import get_filesystem, read_bytes

DEFAULT_TOLERANCE = 0.04


def _as_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    mask = mask > (127 if mask.dtype == np.uint8 else 0.5)
    if mask.shape != shape:
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (shape[1], shape[0]), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized) > 127
    return mask


def energy_ratio(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """(heatmap mass inside ``mask`` / total mass) / (mask area / image area); chance = 1.0."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    inside = _as_mask(mask, heat.shape)
    area_share = inside.mean()
    total = heat.sum()
    if area_share == 0:
        raise ValueError("the lesion mask is empty")
    if total <= 0:
        return 0.0  # no evidence anywhere: scored as missing the lesion
    return float(heat[inside].sum() / total / area_share)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask

    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(mask, structure=(yy**2 + xx**2) <= radius**2)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, *, tolerance: float = 0.0) -> bool:
    """True when the heatmap's maximum falls inside ``mask`` dilated by ``tolerance`` x shorter side.

    A heatmap with no positive value points nowhere and misses. Ties go to the
    first maximum in row-major order.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    inside = _as_mask(mask, heat.shape)
    if not np.isfinite(heat).all() or heat.max() <= 0:
        return False
    radius = int(round(tolerance * min(heat.shape)))
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(_dilate(inside, radius)[row, col])


def summarise(
    heatmaps_and_masks: Iterable[tuple[np.ndarray, np.ndarray]], *, tolerance: float = DEFAULT_TOLERANCE
) -> dict:
    """Mean / median energy ratio and pointing-game hit rates over (heatmap, mask) pairs."""
    ratios, strict, tolerant, shares = [], [], [], []
    for heatmap, mask in heatmaps_and_masks:
        inside = _as_mask(mask, np.asarray(heatmap).shape)
        ratios.append(energy_ratio(heatmap, inside))
        strict.append(pointing_hit(heatmap, inside))
        tolerant.append(pointing_hit(heatmap, inside, tolerance=tolerance))
        shares.append(float(inside.mean()))
    if not ratios:
        raise ValueError("no (heatmap, mask) pairs to score")
    return {
        "n": len(ratios),
        "energy_ratio_mean": float(np.mean(ratios)),
        "energy_ratio_median": float(np.median(ratios)),
        "energy_ratio_chance": 1.0,
        "pointing_game": float(np.mean(strict)),
        "pointing_game_tolerant": float(np.mean(tolerant)),
        "pointing_tolerance": tolerance,
        "chance_pointing": float(np.mean(shares)),
        "mask_area_share_mean": float(np.mean(shares)),
    }


def _read_png_mask(uri: str, s3_endpoint: str | None) -> np.ndarray:

    with Image.open(io.BytesIO(read_bytes(uri, s3_endpoint=s3_endpoint))) as image:
        return np.asarray(image.convert("L")) > 127


def lesion_samples(
    labels_csv: str,
    *,
    classes: Sequence[str] | None = None,
    limit: int | None = None,
    s3_endpoint: str | None = None,
) -> list[dict]:
    """Decodable images with a lesion mask from a synth ``labels.csv``: ``{path, label, pixels, mask}``.

    Corrupt rows and rows without a mask (normal images) are skipped;
    ``classes`` keeps only those labels, ``limit`` caps the count per label.
    """
    fs, csv_path = get_filesystem(labels_csv, s3_endpoint)
    with fs.open(csv_path, "rb") as handle:
        table = pd.read_csv(handle, dtype={"mask_path": str}, keep_default_na=False)
    base = labels_csv.rsplit("/", 1)[0] if "/" in labels_csv else "."

    def resolve(entry: str) -> str:
        return entry if "://" in entry or os.path.isabs(entry) else f"{base}/{entry}"

    reading = InputPolicy(s3_endpoint=s3_endpoint)  # the stored size: masks are drawn at it
    samples: list[dict] = []
    counts: dict[str, int] = {}
    for row in table.itertuples(index=False):
        label = str(row.label)
        mask_path = str(getattr(row, "mask_path", "") or "")
        corrupt = str(getattr(row, "corrupt", "False")).lower() in ("true", "1")
        if not mask_path or corrupt or (classes is not None and label not in classes):
            continue
        if limit is not None and counts.get(label, 0) >= limit:
            continue
        try:
            pixels = load_input(resolve(row.path), reading, name=str(row.path)).image.pixels
        except DecodeError:
            continue
        mask = _as_mask(_read_png_mask(resolve(mask_path), s3_endpoint), pixels.shape)
        if not mask.any():
            continue
        samples.append({"path": str(row.path), "label": label, "pixels": pixels, "mask": mask})
        counts[label] = counts.get(label, 0) + 1
    return samples


def localisation_scores(
    explainer, samples: Sequence[dict], *, target: str | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> dict:
    """Score ``explainer`` (a :class:`~cxr_ray.explain.methods.Explainer`) on lesion samples.

    Each heatmap explains ``target`` (default: the sample's own label, i.e. the
    class whose lesion the mask outlines).
    """
    pairs, scores, correct = [], [], []
    for sample in samples:
        result = explainer.explain(sample["pixels"], target or sample["label"])
        pairs.append((result.heatmap, sample["mask"]))
        scores.append(result.score)
        predicted = max(result.probabilities, key=result.probabilities.get)
        correct.append(predicted == sample["label"])
    summary = summarise(pairs, tolerance=tolerance)
    summary["mean_target_probability"] = float(np.mean(scores))
    summary["accuracy_on_these_images"] = float(np.mean(correct))
    return summary


def localisation_report(
    model,
    card,
    labels_csv: str,
    *,
    methods: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    limit: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    s3_endpoint: str | None = None,
) -> dict:
    """Energy ratio and pointing game per method and lesion class, as a JSON-ready dict.

    ``methods`` defaults to every method the architecture supports; an entry
    ``"gradcam@features.denseblock3"`` reads the map at that layer instead of
    the default one (results are keyed by the entry as given). ``classes``
    to the card's positive class when it has a lesion mask in the archive,
    else every class that has masks. Each class's heatmaps explain that class
    on that class's own images.
    """

    methods = list(methods or [m for m in METHODS if (card.arch, m) in supported_pairs()])
    wanted = list(classes) if classes else None
    samples = lesion_samples(labels_csv, classes=wanted, limit=limit, s3_endpoint=s3_endpoint)
    present = sorted({s["label"] for s in samples})
    if wanted is None and card.positive_class in present:
        wanted = [card.positive_class]
    wanted = [c for c in (wanted or present) if c in present]
    if not wanted:
        raise ValueError(f"{labels_csv}: no decodable images with lesion masks for classes {classes or card.classes}")
    report: dict = {
        "model": card.name,
        "model_version": card.version,
        "arch": card.arch,
        "image_size": card.image_size,
        "labels": os.fspath(labels_csv),
        "layers": {},
        "results": {},
    }
    for entry in methods:
        method, _, layer = entry.partition("@")
        explainer = Explainer(model, card, method, layer=layer or None)
        report["layers"][entry] = explainer.layer
        report["results"][entry] = {
            name: localisation_scores(
                explainer, [s for s in samples if s["label"] == name], tolerance=tolerance
            )
            for name in wanted
        }
    return report
