"""The driver's progress line for one screening pass: rows written of inputs listed, rate, ETA, statuses.

The total is the listing's own count. The listing is one Ray Data task that streams the inputs
(:mod:`cxr_ray.screen.inputs`) and writes its counts (``to_screen``: listed minus already written)
when it reaches the end; until then the total is not known and the line says so, without an ETA.
A local folder or a manifest is usually listed within seconds; an S3 prefix or a PACS study search
is listed as screening goes, so the total appears later. The counts file is read at most every
:data:`LISTING_POLL_S` seconds (one small GET on S3), and never again once read.

``--progress-format json`` prints the same figures as one JSON object per line (``"event":
"progress"``), for a log collector.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from cxr_ray.progress import ProgressLine, eta_seconds

LISTING_POLL_S = 2.0
STILL_LISTING = "total not known yet (still listing)"


class PassProgress(ProgressLine):
    """Progress of one pass; ``listing_total`` returns the listing's ``to_screen`` once it exists."""

    def __init__(self, stream: TextIO, every_s: float, run_id: str, pass_name: str, *,
                 listing_total: Callable[[], int | None], json_lines: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        label = "screen" if pass_name == "screen" else f"screen ({pass_name} pass)"
        # JSON lines are never rewritten in place: a collector reads them as lines.
        super().__init__(label, every_s=every_s, stream=stream, unknown_total=STILL_LISTING,
                         tty=False if json_lines else None, clock=clock)
        self.run_id, self.pass_name, self.json_lines = run_id, pass_name, json_lines
        self.listing_total = listing_total
        self.polled_at: float | None = None

    def _listed(self) -> int | None:
        """The listing's count when it is due to be read and not read yet."""
        if self.total is not None:
            return None
        now = self.clock()
        if self.polled_at is not None and now - self.polled_at < LISTING_POLL_S:
            return None
        self.polled_at = now
        return self.listing_total()

    def begin(self, text: str) -> None:
        if not self.json_lines:  # a collector gets figures, not prose
            super().begin(text)

    def written(self, rows: int, status: dict[str, int]) -> None:
        self.update(rows, total=self._listed(), counts=status)

    def end(self, rows: int, status: dict[str, int]) -> None:
        self.polled_at = None  # the listing has ended by now: read its count
        self.finish(rows, total=self._listed(), counts=status)

    def event(self, now: float, *, final: bool = False) -> dict[str, Any]:
        """The line's figures as one JSON event."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed if final else self.rate(now)
        eta = None if final else eta_seconds(self.done, self.total, rate)
        return {
            "event": "progress", "run_id": self.run_id, "pass": self.pass_name,
            "rows": self.done, "total": self.total, **self.counts,
            "images_per_s": round(rate, 2), "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(elapsed, 1), "final": final,
        }

    def emit(self, now: float, *, final: bool = False) -> None:
        if not self.json_lines:
            super().emit(now, final=final)
            return
        self.writer.stream.write(json.dumps(self.event(now, final=final)) + "\n")
        self.writer.stream.flush()
