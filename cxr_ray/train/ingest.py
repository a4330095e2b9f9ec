"""The Ray Data side of training: decode once, cache, hand out split datasets.

    from_pandas(row_id, path, label)  ->  map_batches(decode_batch)  ->  materialize()
                                             (read, sha256, decode, preprocess)

The decoded, preprocessed tensors are materialized once in the Ray object
store (spread over the cluster, not held by the driver), so epochs never
re-decode. The driver pulls back only the small metadata columns (hash,
status, error code, patient pseudonym) to split, de-duplicate and fingerprint.
Each split is then a materialized subset of that cache: training workers read
their shard with ``get_dataset_shard("train").iter_torch_batches()`` and no
Ray Data task has to run while the workers hold the CPUs.

Memory: the cache holds ``N * S * S * 4`` bytes (10 000 images at 224 px:
2 GB); while a run's splits are materialized they hold a second copy.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import DataContext

from cxr_ray.data.labelled import HEADER_KEYS, decode_batch, grouping_key

META_COLUMNS = ["row_id", "sha256", "status", "error_code", "patient_pseudonym", "view", *HEADER_KEYS]
TENSOR_COLUMNS = ["row_id", "label", "image"]


@contextlib.contextmanager
def deterministic_order():
    """Ray Data keeps block order (decode, subsets and the training shards inherit it).

    Together with the seeded row shuffle and local shuffle this makes a run
    repeatable, and a resumed run sees the same data order as the original.
    """

    options = DataContext.get_current().execution_options
    saved = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = saved


def _blocks(frame: pd.DataFrame, rows_per_block: int) -> list[pd.DataFrame]:
    count = max(1, math.ceil(len(frame) / rows_per_block))
    return [frame.iloc[i * rows_per_block:(i + 1) * rows_per_block] for i in range(count)]


def decode_dataset(
    frame: pd.DataFrame,
    preprocessing: dict[str, Any],
    *,
    s3_endpoint: str | None = None,
    pseudonym_key: bytes | None = None,
    rows_per_block: int = 32,
):
    """Decode + preprocess every row of ``frame`` (``row_id``, ``path``, ``label``) on the cluster.

    Returns ``(dataset, meta)``: the materialized dataset (``row_id``,
    ``label``, ``image`` and the metadata columns) and the metadata as pandas.
    """

    source = ray.data.from_pandas(_blocks(frame[["row_id", "path", "label"]].reset_index(drop=True), rows_per_block))
    decoded = source.map_batches(
        decode_batch,  # type: ignore[arg-type]
        fn_kwargs={"preprocessing": preprocessing, "s3_endpoint": s3_endpoint, "pseudonym_key": pseudonym_key or grouping_key()},
        batch_size=8,
        batch_format="numpy",
    ).materialize()
    meta = decoded.select_columns(META_COLUMNS).to_pandas()
    return decoded, meta.sort_values("row_id").reset_index(drop=True)


def subset(decoded, row_ids, *, columns: list[str] = TENSOR_COLUMNS):
    """Materialized dataset of the rows ``row_ids`` of ``decoded`` (only ``columns``).

    Filtered as Arrow tables so that blocks left empty keep the tensor column type.
    """

    ids = pa.array(np.unique(np.asarray(list(row_ids), dtype=np.int64)))

    def keep_rows(table: pa.Table) -> pa.Table:
        return table.select(columns).filter(pc.is_in(table["row_id"], value_set=ids))

    return decoded.map_batches(keep_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True).materialize()
