"""What is already written under an output prefix: the resume set, duplicates, the run summary.

Everything here is computed from the committed parts themselves (never from
what a run believes it wrote), reading a few columns part by part, so it is
right after a crash, a retry or a resume, and its memory is 16 bytes per row
(the path digests) plus a handful of counters.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.models.card import ModelCard
from cxr_ray.screen.inputs import DIGEST_DTYPE, DoneSet, path_digests
from cxr_ray.screen.output import RUNS_DIR, SUMMARY_FILE, OutputLayout
from cxr_ray.screen.passes import PassResult

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["path", "status", "error_code", "predicted_label", "flagged", "model_name", "model_version", "backend", "run_id"]


@dataclass
class PartsScan:
    """The result of reading every committed part once."""

    parts: list[str] = field(default_factory=list)
    rows: int = 0
    digests: list[np.ndarray] = field(default_factory=list)  # one S16 array per part, in ``parts`` order
    quarantined: list[str] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    flagged: int = 0
    models: Counter = field(default_factory=Counter)  # (name, version) -> rows
    backends: Counter = field(default_factory=Counter)
    runs: Counter = field(default_factory=Counter)  # run_id -> rows

    def done_set(self) -> DoneSet:
        return DoneSet(np.concatenate(self.digests) if self.digests else None)

    def duplicates(self) -> dict[int, np.ndarray]:
        """Rows to drop, ``{part index: row indices}``: every repeat of a path after its first part (by name)."""
        if not self.digests:
            return {}
        alld = np.concatenate(self.digests)
        if len(np.unique(alld)) == len(alld):
            return {}
        part_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(self.digests)])
        row_of = np.concatenate([np.arange(len(d)) for d in self.digests])
        order = np.lexsort((row_of, part_of, alld))  # by digest, then part, then row
        sorted_d = alld[order]
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = sorted_d[1:] == sorted_d[:-1]
        drop: dict[int, list[int]] = {}
        for k in order[repeat]:
            drop.setdefault(int(part_of[k]), []).append(int(row_of[k]))
        return {p: np.asarray(sorted(r)) for p, r in drop.items()}


def scan_parts(layout: OutputLayout, *, quarantine_unreadable: bool = True) -> PartsScan:
    """Read ``SUMMARY_COLUMNS`` of every part; move unreadable parts to ``_quarantine/``."""
    scan = PartsScan()
    for path, table in layout.read_parts(layout.list_parts(), SUMMARY_COLUMNS):
        if isinstance(table, Exception):
            if quarantine_unreadable:
                target = layout.quarantine(path)
                log.warning("unreadable part moved aside: %s -> %s (%s)", path, target, type(table).__name__)
                scan.quarantined.append(target)
                continue
            raise table
        _add(scan, path, table)
    return scan


def _counts(column: pa.ChunkedArray) -> Counter:
    out: Counter = Counter()
    for item in pc.value_counts(column).to_pylist():
        out[item["values"]] += item["counts"]
    return out


def _add(scan: PartsScan, path: str, table: pa.Table) -> None:
    scan.parts.append(path)
    scan.rows += len(table)
    scan.digests.append(path_digests(table.column("path").to_pylist()).astype(DIGEST_DTYPE))
    scan.status.update(_counts(table.column("status")))
    scan.error_codes.update({k: v for k, v in _counts(table.column("error_code")).items() if k is not None})
    scan.labels.update({k: v for k, v in _counts(table.column("predicted_label")).items() if k is not None})
    scan.flagged += int(pc.sum(table.column("flagged").fill_null(False).cast(pa.int64())).as_py() or 0)
    names = table.column("model_name").to_pylist()
    versions = table.column("model_version").to_pylist()
    scan.models.update(zip(names, versions, strict=True))
    scan.backends.update({k: v for k, v in _counts(table.column("backend")).items() if k is not None})
    scan.runs.update(_counts(table.column("run_id")))


def remove_duplicates(layout: OutputLayout, scan: PartsScan) -> int:
    """Rewrite parts so that every path has exactly one row; returns rows removed.

    Duplicates need two writes of the same input in different batches, which
    the pipeline avoids (resume skips written inputs; retried batches rewrite
    their own part). They can still come from a manifest that lists a file
    twice or a lineage re-execution that re-batches rows. The first part (by
    name) keeps the row. The replacement is written before the original is
    deleted, so a crash in between leaves duplicates for the next run to
    remove, never a loss.
    """
    removed = 0
    for index, rows in scan.duplicates().items():
        path = scan.parts[index]
        table = layout.read_part(path)
        keep = np.ones(len(table), dtype=bool)
        keep[rows] = False
        removed += int((~keep).sum())
        if keep.any():
            new_name = layout.write_part(table.filter(pa.array(keep)))
            if new_name == path.rsplit("/", 1)[-1]:
                continue
        layout.remove(path)
    return removed


# --------------------------------------------------------------------------- the run summary


def model_record(card: ModelCard) -> dict[str, Any]:
    return {
        "name": card.name,
        "version": card.version,
        "arch": card.arch,
        "classes": list(card.classes),
        "positive_class": card.positive_class,
        "threshold": card.threshold,
        "image_size": card.image_size,
    }


def _run_record(run_id: str, started_at: datetime, seconds: float, passes: list[PassResult], screened: int,
                crashed_rows: int, duplicates: int, card: ModelCard) -> dict[str, Any]:
    """What ``_runs/<run_id>.json`` says about this run."""
    first = passes[0]
    return {
        "run_id": run_id,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "inputs_listed": first.listed,
        "already_done": first.already_done,
        "screened": screened,
        "images_per_s": round(screened / seconds, 3) if seconds > 0 else None,
        "backend": next((p.backend for p in passes if p.backend), None),
        "passes": [asdict(p) | {"missing": p.missing} for p in passes],
        "worker_crashed_rows": crashed_rows,
        "duplicates_removed": duplicates,
        "model": model_record(card),
    }


def finish_run(
    layout: OutputLayout,
    card: ModelCard,
    run_id: str,
    started_at: datetime,
    seconds: float,
    passes: list[PassResult],
    crashed_rows: int,
    resumed_rows: int,
) -> dict[str, Any]:
    """Check what is written (de-duplicating if needed), record the run, write ``_summary.json``.

    The counts come from the parts themselves (all runs), read once more: 16
    bytes per row in the driver for the duplicate check, plus counters.
    """
    final = scan_parts(layout)
    duplicates = remove_duplicates(layout, final)
    if duplicates:
        final = scan_parts(layout)
    screened = sum(p.written for p in passes) + crashed_rows
    first = passes[0]
    missing = max(0, first.to_screen - screened)
    run_record = _run_record(run_id, started_at, seconds, passes, screened, crashed_rows, duplicates, card)
    layout.write_json(f"{RUNS_DIR}/{run_id}.json", run_record)
    runs = [r for r in layout.list_json(RUNS_DIR, ".json") if "passes" in r]
    summary = {
        "output": layout.uri,
        "complete": missing == 0,
        "inputs": first.listed,
        "rows": final.rows,
        "missing": missing,
        "resumed_rows": resumed_rows,
        "screened_this_run": screened,
        "status": {s: final.status.get(s, 0) for s in ("ok", "error", "skipped")},
        "error_codes": dict(sorted(final.error_codes.items())),
        "predicted_label": {c: final.labels.get(c, 0) for c in card.classes},
        "flagged": final.flagged,
        "threshold": card.threshold,
        "model": model_record(card),
        "backend": run_record["backend"],
        "backends": dict(final.backends),
        "engines": layout.engines(run_id),  # each engine this run's actors loaded: describe(), with its check
        "run_id": run_id,
        "run_ids": sorted(final.runs),
        "images_per_s": run_record["images_per_s"],
        "steady_images_per_s": first.steady_images_per_s,
        "seconds": run_record["seconds"],
        "runs": [
            {k: r.get(k) for k in ("run_id", "started_at", "seconds", "screened", "images_per_s", "backend")}
            for r in sorted(runs, key=lambda r: r.get("started_at", ""))
        ],
        "parts": len(final.parts),
        "duplicates_removed": duplicates,
        "quarantined_parts": final.quarantined,
        "worker_crashed_rows": crashed_rows,
    }
    layout.write_json(SUMMARY_FILE, summary)
    return summary
