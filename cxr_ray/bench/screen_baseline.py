"""``cxr-ray bench screen``'s baseline: what a user would write without this project.

A ``torch.utils.data.DataLoader`` with ``cores`` workers decoding full images
with Pillow / pydicom and resizing with ``F.interpolate``, feeding the eager
NCHW fp32 model with torch's default threads.
"""

from __future__ import annotations

import time

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from torch.utils.data import DataLoader

from cxr_ray.bench.measure import CpuMeter
from cxr_ray.models.artifact import load_model


class _PlainXrays:
    """A torch Dataset as a user would write it: decode the whole file, resize with torch."""

    def __init__(self, paths: list[str], image_size: int, mean: float, std: float) -> None:
        self.paths, self.image_size, self.mean, self.std = paths, image_size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, path: str):
        with open(path, "rb") as handle:
            head = handle.read(132)
        if head[128:132] == b"DICM":
            ds = pydicom.dcmread(path)
            arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
            if ds.get("PhotometricInterpretation") == "MONOCHROME1":
                arr = arr.max() - arr
        else:
            with Image.open(path) as image:
                if image.mode not in ("L", "I", "I;16", "F"):
                    image = image.convert("L")  # type: ignore[assignment]
                arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo if hi > lo else 1.0)

    def __getitem__(self, index: int):
        try:
            pixels = torch.from_numpy(self._pixels(self.paths[index]))[None, None]
        except Exception:  # noqa: BLE001 - a broken file: zeros, as many user loops do
            pixels = torch.zeros(1, 1, self.image_size, self.image_size)
        resized = F.interpolate(
            pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
        )
        return ((resized[0] - self.mean) / self.std).float()


def plain_pytorch(artifact: str, paths: list[str], batch_size: int, workers: int) -> dict:

    model, card = load_model(artifact)
    cfg = card.preprocess_config
    loader = DataLoader(  # type: ignore[var-annotated]
        _PlainXrays(paths, cfg.image_size, cfg.mean, cfg.std),  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=workers,
    )
    n = 0
    with CpuMeter() as cpu, torch.no_grad():
        t0 = time.perf_counter()
        for batch in loader:
            torch.softmax(model(batch), dim=1)
            n += len(batch)
        wall = time.perf_counter() - t0
    return {
        "images": n,
        "seconds": round(wall, 3),
        "images_per_s": n / wall,
        **cpu.report(n, wall),
        "num_workers": workers,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }
