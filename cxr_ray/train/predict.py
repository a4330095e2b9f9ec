"""Class probabilities for a decoded dataset, on the cluster (Ray Data ``map_batches``).

Used after training (validation split to choose the threshold, test split for
the final metrics) and by ``cxr-ray evaluate``. The input rows are what
:mod:`cxr_ray.train.ingest` caches: ``row_id`` and the unit ``image``, standardised here
with the artifact's preprocessing.

Prediction runs as Ray Data *tasks*, not an actor pool: Ray reuses task
worker processes, and each keeps the last network it built (keyed by the
weights' object ref), so a pass costs no actor start-up (importing torch in a
fresh process) and the network is built once per worker process, not per batch.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from cxr_ray.engines.tta import views
from cxr_ray.models.ensemble import build_network
from cxr_ray.preprocess import PreprocessConfig, standardise

_CACHE: dict[str, tuple[torch.nn.Module, torch.device]] = {}  # one model per worker process


def _model(state_ref, arch: str, num_classes: int, use_gpu: bool,
           temperatures: list[float] | None) -> tuple[torch.nn.Module, torch.device]:

    key = f"{state_ref.hex()}:{arch}:{num_classes}:{use_gpu}:{temperatures}"
    if key not in _CACHE:
        _CACHE.clear()
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = build_network(arch, num_classes, temperatures)
        model.load_state_dict(ray.get(state_ref))
        _CACHE[key] = (model.eval().to(device), device)
    return _CACHE[key]


def predict_batch(batch: dict[str, np.ndarray], *, state_ref: list, arch: str, num_classes: int,
                  preprocessing: dict, use_gpu: bool = False,
                  temperatures: list[float] | None = None, tta: int = 1) -> dict[str, np.ndarray]:
    """``{"row_id", "probs"}`` for a batch of cached unit images (standardised here; softmax of the logits).

    ``tta`` > 1: the mean over that many fixed views per image (:mod:`cxr_ray.engines.tta`, as screen and serve).
    """
    model, device = _model(state_ref[0], arch, num_classes, use_gpu, temperatures)
    unit = np.array(batch["image"], dtype=np.float32)  # a writable copy
    inputs = standardise(unit, PreprocessConfig.from_dict(preprocessing))
    images = torch.from_numpy(views(inputs, tta) if tta > 1 else inputs).to(device)
    with torch.inference_mode():
        probs = torch.softmax(model(images).float(), dim=1).cpu().numpy()
    if tta > 1:
        probs = probs.reshape(len(unit), tta, -1).mean(axis=1)
    return {"row_id": np.asarray(batch["row_id"], dtype=np.int64), "probs": probs}


def predict_probs(
    dataset,
    state: dict[str, torch.Tensor],
    arch: str,
    num_classes: int,
    *,
    preprocessing: dict,
    use_gpu: bool = False,
    batch_size: int = 64,
    temperatures: list[float] | None = None,
    tta: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(row_ids, probs)`` sorted by row id, for every row of ``dataset``.

    ``temperatures``: ``state`` is a fold ensemble's (see :func:`cxr_ray.models.ensemble.build_network`).
    """

    state_ref = ray.put({k: v.detach().cpu() for k, v in state.items()})
    predicted = dataset.select_columns(["row_id", "image"]).map_batches(
        predict_batch,
        fn_kwargs={"state_ref": [state_ref], "arch": arch, "num_classes": num_classes,
                   "preprocessing": dict(preprocessing), "use_gpu": use_gpu, "temperatures": temperatures,
                   "tta": tta},
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
    )
    ids, probs = [], []
    for batch in predicted.iter_batches(batch_format="numpy", batch_size=None):
        if len(batch["row_id"]):
            ids.append(np.asarray(batch["row_id"], dtype=np.int64))
            probs.append(np.asarray(batch["probs"], dtype=np.float32))
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros((0, num_classes), dtype=np.float32)
    row_ids, all_probs = np.concatenate(ids), np.concatenate(probs)
    order = np.argsort(row_ids, kind="stable")
    return row_ids[order], all_probs[order]
