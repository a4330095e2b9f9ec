"""The report's charts as PNG bytes (matplotlib's object API on the Agg canvas: no pyplot state,
safe in any thread, nothing left behind)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_ray.evaluate.drift import PSI_MODERATE, PSI_SIGNIFICANT, DriftResult
from cxr_ray.screen.report.collect import CHART_BINS, ReportData
from cxr_ray.screen.schema import status_for

DPI = 100
STATUS_COLOURS = {"ok": "#2e7d32", "skipped": "#9e9e9e", "error": "#c62828"}
LEVEL_COLOURS = {"stable": "#2e7d32", "moderate": "#f9a825", "significant": "#c62828"}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def counts_chart(status: Counter, error_codes: Counter) -> bytes:
    """Rows by status, and errors (red) / skips (grey) by code."""
    fig = _figure(8, 3)
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    names = list(status)
    left.bar(names, [status[n] for n in names], color=[STATUS_COLOURS.get(n, "#607d8b") for n in names])
    left.set_title("rows by status")
    codes = sorted(error_codes, key=lambda c: error_codes[c])
    if codes:
        right.barh(codes, [error_codes[c] for c in codes], color=[STATUS_COLOURS[status_for(c)] for c in codes])
    else:
        right.text(0.5, 0.5, "no errors or skips", ha="center", va="center", transform=right.transAxes)
    right.set_title("errors and skips by code")
    return _png(fig)


def score_chart(data: ReportData, threshold: float, reference: list[int] | None) -> bytes:
    """Histogram of the positive-class score of ``ok`` rows, the threshold, and validation's shape."""
    fig = _figure(8, 3)
    ax = fig.subplots()
    edges = np.linspace(0, 1, CHART_BINS + 1)
    total = max(int(data.chart_counts.sum()), 1)
    ax.bar(edges[:-1], data.chart_counts / total, width=1 / CHART_BINS, align="edge", color="#1565c0",
           alpha=0.8, label=f"screened ({data.scored} images)")
    if reference and sum(reference) > 0:
        ref_edges = np.linspace(0, 1, len(reference) + 1)
        shares = np.asarray(reference, dtype=float) / sum(reference) * len(reference) / CHART_BINS
        ax.stairs(shares, ref_edges, color="#ef6c00", linewidth=2, label="validation (model.json)")
    ax.axvline(threshold, color="#c62828", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("score (positive class)")
    ax.set_ylabel("share of images")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper center", fontsize=8)
    return _png(fig)


def throughput_series(batches: Counter, started: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the run started, images written so far), one point per written batch.

    ``started`` is the run's start (its ``_runs`` record); without it, the first batch's time.
    """
    times = np.asarray(sorted(batches), dtype=np.float64)
    rows = np.cumsum([batches[t] for t in sorted(batches)])
    origin = started if started is not None and started <= times[0] else times[0]
    return np.concatenate([[0.0], times - origin]), np.concatenate([[0], rows])


def throughput_chart(runs: dict[str, Counter], starts: dict[str, float]) -> bytes:
    """Images written over each run's time (from the rows' ``screened_at``): the slope is the
    throughput, a flat start is start-up (actors loading the model), a kink a slow stretch."""
    fig = _figure(8, 3)
    ax = fig.subplots()
    for run_id, batches in sorted(runs.items()):
        x, y = throughput_series(batches, starts.get(run_id))
        rate = (y[-1] - y[1]) / (x[-1] - x[1]) if len(x) > 2 and x[-1] > x[1] else None
        label = f"run {run_id}: {int(y[-1])} rows" + (f", {rate:.1f} images/s after the first batch" if rate else "")
        ax.step(x, y, where="post", marker="o", markersize=3, label=label)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("images written")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if runs:
        ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def drift_chart(result: DriftResult) -> bytes:
    """PSI per compared distribution, with the 0.1 / 0.2 lines."""
    fig = _figure(8, 0.6 + 0.4 * max(len(result.checks), 1))
    ax = fig.subplots()
    names = [c.name for c in result.checks]
    ax.barh(names, [c.psi for c in result.checks], color=[LEVEL_COLOURS[c.level] for c in result.checks])
    for line in (PSI_MODERATE, PSI_SIGNIFICANT):
        ax.axvline(line, color="#424242", linestyle=":", linewidth=1)
    ax.set_xlabel("population stability index (PSI)")
    ax.invert_yaxis()
    return _png(fig)
