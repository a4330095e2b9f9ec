"""The model's drift fingerprint, from its validation predictions (what ``model.json`` keeps for
the screening report's drift check; see :mod:`cxr_ray.models.fingerprint`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cxr_ray.data.labelled import HEADER_KEYS
from cxr_ray.models.card import ModelCard
from cxr_ray.models.fingerprint import build_fingerprint


def validation_fingerprint(card: ModelCard, table: pd.DataFrame, row_ids: np.ndarray, probs: np.ndarray,
                           computed_on: str = "validation", calibrated: bool = False) -> dict[str, Any] | None:
    """Score histogram (through ``card.decide``, as screening scores) and header mix of ``row_ids``.

    ``probs`` are the model's probabilities for ``row_ids`` in that order (``calibrated``: already
    temperature-scaled); ``table`` is the
    prepared table (decode metadata per ``row_id``). None when there are no such rows.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if not len(row_ids):
        return None
    rows = table.set_index("row_id").reindex(row_ids).rename(columns={"view": "view_position"})
    records = rows.reindex(columns=["view_position", *HEADER_KEYS]).to_dict("records")
    # ``calibrated``: each fold's own temperature is already applied (k-fold CV); else the card's applies
    scores = probs[:, card.positive_index] if calibrated and card.positive_index is not None else card.decide(probs).scores
    return build_fingerprint(scores, records, positive_class=card.positive_class, computed_on=computed_on)
