"""The output prefix of a screening run, and how parts get there safely.

Layout under ``OUTPUT`` (a local directory or an ``s3://`` prefix)::

    parts/part-<digest>.parquet   the rows, one file per written batch
    _heatmaps/<digest>.<method>.png  (and .npy) overlays of flagged rows, with --heatmaps flagged
    _runs/<run_id>.json           one record per run (counts, throughput, model)
    _runs/<run_id>.listing.json   what that run's listing saw
    _quarantine/*.unreadable      parts found unreadable on resume (kept for a look)
    _summary.json                 counts over ALL rows, rewritten by every run
    _SUCCESS                      written last, only when every input has a row

Everything but ``parts/`` starts with ``_``, which pyarrow, pandas and Spark skip
when they read ``OUTPUT`` as a dataset: ``pd.read_parquet(OUTPUT)`` gets the rows only.

Safety rules the resume logic depends on:

* A part is written **atomically** (:func:`cxr_ray.io.storage.open_output`:
  temporary file + rename locally, one committed upload on S3), so a killed
  run never leaves half a part that a reader or a resume could see.
* A part's name is a digest of the paths it holds. A batch written twice (Ray
  retrying a task whose output was lost) lands on the same name and replaces
  itself instead of duplicating rows.
* Readers should read ``parts/*.parquet`` (hidden temporaries never match).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_ray.io.storage import get_filesystem, is_remote, join, open_output, to_pyarrow_filesystem

PARTS_DIR = "parts"
RUNS_DIR = "_runs"
ENGINES_DIR = f"{RUNS_DIR}/engines"  # <run_id>-<digest>.json: each distinct engine a run's actors loaded
QUARANTINE_DIR = "_quarantine"
HEATMAPS_DIR = "_heatmaps"  # not "heatmaps": readers of OUTPUT would try the PNGs as Parquet
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


def part_name(paths: list[str]) -> str:
    """Content-addressed part file name: the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()[:32]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


class OutputLayout:
    """Addresses and file operations under one output prefix."""

    def __init__(self, uri: str, s3_endpoint: str | None = None) -> None:
        self.uri = uri.rstrip("/") if is_remote(uri) else uri
        self.s3_endpoint = s3_endpoint
        self.fs, self.root = get_filesystem(uri, s3_endpoint)
        self.arrow_fs = to_pyarrow_filesystem(self.fs)

    # ------------------------------------------------------------------ addresses
    def uri_of(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def parts_uri(self) -> str:
        return self.uri_of(PARTS_DIR)

    def _ls(self, directory: str) -> list[str]:
        """Names in ``directory``, fresh (s3fs caches listings; other writers add parts)."""
        self.fs.invalidate_cache(directory)
        try:
            return self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ parts
    def list_parts(self) -> list[str]:
        """File-system paths of the committed parts, sorted by name."""
        directory = self._path(PARTS_DIR)
        names = self._ls(directory)
        out = []
        for name in names:
            base = posixpath.basename(name.rstrip("/"))
            if base.startswith(PART_PREFIX) and base.endswith(PART_SUFFIX):
                out.append(name if name.startswith(directory) else self._path(PARTS_DIR, base))
        return sorted(out)

    def write_part(self, table: pa.Table) -> str:
        """Write ``table`` atomically as a content-addressed part; returns its name."""
        name = part_name(table.column("path").to_pylist())
        with open_output(self.uri_of(PARTS_DIR, name), "wb", s3_endpoint=self.s3_endpoint) as handle:
            pq.write_table(table, handle, compression="zstd")
        return name

    def read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.arrow_fs)

    def read_parts(
        self, paths: list[str], columns: list[str] | None, threads: int = 8
    ) -> Iterator[tuple[str, pa.Table | Exception]]:
        """(path, table) per part in order, read ``threads`` at a time; an unreadable part gives its exception."""

        def one(path: str):
            try:
                return path, self.read_part(path, columns)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, part by part
                return path, exc

        if len(paths) <= 1:
            yield from (one(p) for p in paths)
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            # map() keeps at most len(paths) futures; bound memory by reading in windows.
            window = threads * 4
            for start in range(0, len(paths), window):
                yield from pool.map(one, paths[start : start + window])

    def quarantine(self, path: str) -> str:
        """Move an unreadable part aside (never deleted: it may be worth a look). The new name
        does not end in ``.parquet``, so ``OUTPUT/**/*.parquet`` readers do not trip on it."""
        target = self._path(QUARANTINE_DIR, posixpath.basename(path) + ".unreadable")
        self.fs.makedirs(self._path(QUARANTINE_DIR), exist_ok=True)
        self.fs.mv(path, target)
        return target

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path)

    def clean_temporaries(self) -> int:
        """Remove hidden temporaries a killed run left in ``parts/`` (local only; S3 uploads
        that were never completed are invisible and are reaped by the bucket's lifecycle rules)."""
        if is_remote(self.uri):
            return 0
        removed = 0
        names = self._ls(self._path(PARTS_DIR))
        for name in names:
            base = posixpath.basename(name)
            if base.startswith(".") and ".tmp-" in base:
                self.remove(name)
                removed += 1
        return removed

    # ------------------------------------------------------------------ small JSON files / markers
    def write_json(self, relative: str, data: dict) -> None:
        with open_output(self.uri_of(*relative.split("/")), "w", s3_endpoint=self.s3_endpoint) as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")

    def read_json(self, relative: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(*relative.split("/"))))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def list_json(self, directory: str, suffix: str) -> list[dict]:
        names = sorted(self._ls(self._path(directory)))
        out = []
        for name in names:
            base = posixpath.basename(name)
            if base.endswith(suffix) and not base.startswith("."):
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    out.append(json.loads(self.fs.cat_file(name)))
        return out

    def write_engine(self, run_id: str, record: dict) -> None:
        """What one predict actor loaded (``backend.describe()``: engine, precision, load-time check);
        actors that loaded the same engine write the same file (its name is a digest of the record)."""
        text = json.dumps(record, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.write_json(f"{ENGINES_DIR}/{run_id}-{digest}.json", {"run_id": run_id, **json.loads(text)})

    def engines(self, run_id: str) -> list[dict]:
        """The engines ``run_id``'s actors recorded (:meth:`write_engine`), without the run id."""
        records = self.list_json(ENGINES_DIR, ".json") if self.exists(ENGINES_DIR) else []
        return [{k: v for k, v in r.items() if k != "run_id"} for r in records if r.get("run_id") == run_id]

    def exists(self, relative: str) -> bool:
        path = self._path(*relative.split("/"))
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def remove_marker(self) -> None:
        self.remove(self._path(SUCCESS_FILE))

    def write_marker(self) -> None:
        with open_output(self.uri_of(SUCCESS_FILE), "wb", s3_endpoint=self.s3_endpoint):
            pass
