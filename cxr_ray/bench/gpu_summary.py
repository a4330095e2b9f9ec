"""A short table of a ``cxr-ray bench gpu`` report, for the end of a device run's output.

``python -m cxr_ray.bench.gpu_summary REPORT.json``: the device, engine images/s per batch size,
decode rates, end to end and the targets, in a few dozen lines (the full report is the JSON file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _engines(engines: dict[str, Any]) -> list[str]:
    if "error" in engines:
        return [f"engines: {engines['error']}"]
    sizes = sorted({r["batch_size"] for r in engines["rows"]})
    lines = ["engine img/s by batch " + " ".join(f"{s:>9}" for s in sizes) + "  max|diff| vs CPU fp32"]
    for variant in dict.fromkeys(r["variant"] for r in engines["rows"]):
        rows = {r["batch_size"]: r for r in engines["rows"] if r["variant"] == variant}
        cells = [f"{rows[s]['images_per_s']:>9.1f}" if "images_per_s" in rows.get(s, {}) else f"{'-':>9}" for s in sizes]
        diff = next((r["max_abs_diff_vs_cpu_fp32"] for r in rows.values() if "max_abs_diff_vs_cpu_fp32" in r), None)
        lines.append(f"  {variant:<28}" + " ".join(cells) + f"  {diff if diff is None else f'{diff:.2e}'}")
    lines += [f"  skipped {s['variant']}: {s['reason'][:120]}" for s in engines["skipped"]]
    return lines


def _decode(decode: dict[str, Any]) -> list[str]:
    if "error" in decode:
        return [f"decode: {decode['error']}"]
    lines = [f"decode ({decode['codec']} {decode.get('codec_version') or ''}): files/s GPU vs one CPU core"]
    for name, s in decode["sets"].items():
        lines.append(f"  {name:<24} gpu {s['gpu_files_per_s']:>9.1f}  cpu {s['cpu_files_per_s_one_core']:>8.1f}  "
                     f"x{s['ratio_gpu_vs_one_core']:<6} max|diff| {s.get('max_abs_diff')}  {s['fallbacks_and_errors'] or ''}")
    return lines


def summary(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = [f"device: {device.get('name')} ({device.get('kind')}, capability {device.get('capability')}, "
             f"torch {device.get('torch')}, CUDA {device.get('cuda_runtime')}); measured on a GPU: {report['measured_on_gpu']}"]
    lines += _engines(report.get("engines", {"error": "missing"}))
    lines += _decode(report.get("decode", {"error": "missing"}))
    for mode, e2e in report.get("end_to_end", {}).items():
        lines.append(f"end to end, {mode}: " + (e2e["error"] if "error" in e2e else
                     f"{e2e['images_per_s']} img/s ({e2e['backend']}, {e2e['files']} files, {e2e['statuses']})"))
    lines.append(f"targets: {json.dumps(report.get('targets'))}")
    lines.append(f"elapsed: {report.get('elapsed_s')} s")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(json.loads(Path(sys.argv[1]).read_text())))
