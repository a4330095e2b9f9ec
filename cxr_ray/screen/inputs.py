"""Streaming the input list into Ray Data, minus what a previous run already wrote.

The archive is never listed into the driver. One Ray Data read task runs
:func:`cxr_ray.io.storage.expand_inputs` (which itself streams: one S3 page,
one local directory or one manifest record batch at a time) and yields blocks
of ``block_rows`` paths as it goes. Ray Data's streaming-generator
back-pressure pauses the listing while downstream stages are busy, so the
listing runs ahead of decoding by a few blocks, not by the archive. (Ray Data
merges what one task yields up to ``DataContext.target_max_block_size``; the
job sets that to 1 MiB, about 10k paths, and cuts the stream into
decode-sized blocks right after: :func:`cxr_ray.screen.job._decode_sized_blocks`.)

Resume needs to know what is already written. That set is held as
:class:`DoneSet`: a sorted array of 16-byte BLAKE2b digests of the written
paths, **16 bytes per input already written** (160 MB for 10 million), built by
the driver from the ``path`` column of the existing parts, put once into the
object store and read zero-copy by the listing task. This is the one
structure whose size grows with the archive; everything else is bounded by
block and batch sizes. A 128-bit digest makes a false "already written"
(which would lose an input) practically impossible (about 1e-25 for 10
million inputs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from cxr_ray.dicomnet.web import DicomwebAuth
from cxr_ray.io.storage import expand_inputs, open_output

DIGEST_BYTES = 16
DIGEST_DTYPE = f"S{DIGEST_BYTES}"


def path_digests(paths: Iterable[str]) -> np.ndarray:
    """``S16`` array of BLAKE2b-128 digests of each path (UTF-8), in input order."""
    raw = b"".join(hashlib.blake2b(p.encode("utf-8"), digest_size=DIGEST_BYTES).digest() for p in paths)
    return np.frombuffer(raw, dtype=DIGEST_DTYPE) if raw else np.empty(0, dtype=DIGEST_DTYPE)


class DoneSet:
    """Paths already screened, as sorted unique 128-bit digests (16 bytes each)."""

    def __init__(self, digests: np.ndarray | None = None) -> None:
        digests = np.empty(0, dtype=DIGEST_DTYPE) if digests is None else digests
        self.digests = np.unique(digests.astype(DIGEST_DTYPE, copy=False))  # sorted

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def nbytes(self) -> int:
        return int(self.digests.nbytes)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``digests`` are in the set."""
        if not len(self.digests) or not len(digests):
            return np.zeros(len(digests), dtype=bool)
        index = np.searchsorted(self.digests, digests)
        index[index == len(self.digests)] = 0
        return self.digests[index] == digests


def listing_stats_name(run_id: str, pass_name: str) -> str:
    """File name (under ``_runs/``) of one pass's listing counts."""
    return f"{run_id}.{pass_name}.listing.json"


class InputListing(Datasource):
    """A Ray Data datasource: ONE read task streaming ``spec`` in blocks of paths.

    Paths whose digest is in the :class:`DoneSet` behind ``done_ref`` (an
    object ref, or None) are dropped. When the listing ends, the task writes
    its counts (``listed``, ``already_done``, ``to_screen``) as JSON to
    ``stats_uri``; the driver uses them to check that every listed input got
    a row.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        *,
        s3_endpoint: str | None,
        done_ref,
        block_rows: int,
        stats_uri: str,
        dicomweb_auth: DicomwebAuth | None = None,
    ) -> None:
        super().__init__()
        self.specs = [spec] if isinstance(spec, str) else list(spec)
        self.s3_endpoint = s3_endpoint
        self.done_ref = done_ref
        self.block_rows = int(block_rows)
        self.stats_uri = stats_uri
        self.dicomweb_auth = dicomweb_auth

    def get_name(self) -> str:
        return "ListInputs"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        specs, s3_endpoint, done_ref = self.specs, self.s3_endpoint, self.done_ref
        block_rows, stats_uri, auth = self.block_rows, self.stats_uri, self.dicomweb_auth
        return [
            ReadTask(
                lambda: _list_blocks(specs, s3_endpoint, done_ref, block_rows, stats_uri, auth),
                meta,
                per_task_row_limit=per_task_row_limit,
            )
        ]


def _list_blocks(
    specs: list[str], s3_endpoint: str | None, done_ref, block_rows: int, stats_uri: str,
    auth: DicomwebAuth | None = None,
) -> Iterator[pa.Table]:
    done: DoneSet = ray.get(done_ref) if done_ref is not None else DoneSet()
    listed = already = 0
    started = time.time()

    def keep(paths: list[str]) -> pa.Table | None:
        nonlocal already
        mask = ~done.contains(path_digests(paths))
        already += int(len(paths) - mask.sum())
        kept = [p for p, k in zip(paths, mask, strict=True) if k]
        return pa.table({"path": pa.array(kept, pa.string())}) if kept else None

    pending: list[str] = []
    for path in expand_inputs(specs, s3_endpoint=s3_endpoint, dicomweb_auth=auth):
        listed += 1
        pending.append(path)
        if len(pending) >= block_rows:
            block, pending = keep(pending), []
            if block is not None:
                yield block
    if pending and (block := keep(pending)) is not None:
        yield block
    stats = {
        "listed": listed,
        "already_done": already,
        "to_screen": listed - already,
        "listing_seconds": round(time.time() - started, 3),
    }
    with open_output(stats_uri, "w", s3_endpoint=s3_endpoint) as handle:
        json.dump(stats, handle)
