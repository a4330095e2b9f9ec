"""The k-fold table the papers print: one row per fold, then mean ± std (``cv_table.md`` / ``.csv``).

Columns are the figures a clinician reads: accuracy, balanced accuracy, the
positive class's sensitivity, specificity and AUC at the validation-chosen
threshold (with their patient-level 95% CIs in the Markdown), macro AUC and
the expected calibration error of the calibrated probabilities. The CSV holds
the same numbers unrounded, one row per fold plus ``mean`` and ``std`` rows,
for a spreadsheet or a paper's supplement.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

# (column title, path in a classification report)
_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("accuracy", ("accuracy",)),
    ("balanced_accuracy", ("balanced_accuracy",)),
    ("macro_auc", ("macro_auc",)),
    ("sensitivity", ("binary", "sensitivity")),
    ("specificity", ("binary", "specificity")),
    ("auc", ("binary", "auc")),
    ("ece", ("calibration", "ece")),
)
_CI_PATHS = {
    "accuracy": ("ci95", "accuracy"),
    "balanced_accuracy": ("ci95", "balanced_accuracy"),
    "sensitivity": ("binary", "ci95", "sensitivity"),
    "specificity": ("binary", "ci95", "specificity"),
    "auc": ("binary", "ci95", "auc"),
}


def _get(report: dict, path: tuple[str, ...]):
    value = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _columns(reports: list[dict]) -> list[str]:
    """The columns that at least one fold defines (no positive class: no binary columns)."""
    return [name for name, path in _COLUMNS if any(_get(r, path) is not None for r in reports)]


def fold_rows(reports: list[dict]) -> list[dict]:
    """``[{"fold": i, column: value, ...}, ..., mean row, std row]`` (sample std, ddof=1)."""
    columns = _columns(reports)
    paths = dict(_COLUMNS)
    rows = [{"fold": str(i), **{c: _get(r, paths[c]) for c in columns}} for i, r in enumerate(reports)]
    mean: dict[str, Any] = {"fold": "mean"}
    std: dict[str, Any] = {"fold": "std"}
    for c in columns:
        values = np.array([row[c] for row in rows if row[c] is not None], dtype=np.float64)
        mean[c] = float(values.mean()) if values.size else None
        std[c] = float(values.std(ddof=1)) if values.size >= 2 else (0.0 if values.size else None)
    return [*rows, mean, std]


def to_csv(reports: list[dict]) -> str:
    rows = fold_rows(reports)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def to_markdown(reports: list[dict], *, positive_class: str | None = None, title: str | None = None) -> str:
    """Percentages, one decimal; each fold's cell carries its 95% CI; the last row is mean ± std."""
    rows = fold_rows(reports)
    columns = [c for c in rows[0] if c != "fold"]
    heading = {c: (f"{positive_class} {c}" if positive_class and c in ("sensitivity", "specificity", "auc") else c)
               for c in columns}
    lines = [f"### {title}", ""] if title else []
    lines.append("| fold | " + " | ".join(heading[c].replace("_", " ") + " (%)" for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for i, report in enumerate(reports):
        cells = []
        for c in columns:
            cell = _pct(rows[i][c])
            ci = _get(report, _CI_PATHS[c]) if c in _CI_PATHS else None
            if ci and rows[i][c] is not None:
                cell += f" [{_pct(ci[0])}, {_pct(ci[1])}]"
            cells.append(cell)
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    mean, std = rows[-2], rows[-1]
    lines.append("| **mean ± std** | " + " | ".join(
        f"**{_pct(mean[c])} ± {_pct(std[c])}**" for c in columns) + " |")
    lines.append("")
    lines.append("CIs: 95% percentile bootstrap over patients (all images of a patient resampled together). "
                 "Sensitivity/specificity at the threshold chosen on each fold's validation patients. "
                 "ECE: 15-bin top-label expected calibration error of the calibrated probabilities.")
    return "\n".join(lines) + "\n"
