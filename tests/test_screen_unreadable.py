"""Screening a folder with entries that cannot be read: each one is a ``read_failed`` row, none is dropped."""

from __future__ import annotations

import os

from _screen_testing import make_archive, make_artifact, read_rows

from cxr_ray.screen.config import ScreenConfig
from cxr_ray.screen.job import run_screen


def _entries(root) -> list[str]:
    """Every non-directory entry below ``root`` (symlinks not followed), skipping hidden names."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [os.path.join(directory, f) for f in files if not f.startswith(".")]
    return found


def test_a_dangling_symlink_and_a_fifo_are_read_failed_rows(ray_cluster, tmp_path):
    root = tmp_path / "archive"
    make_archive(root, n=6, corrupt_fraction=0.0, seed=11)
    dangling, fifo = root / "dangling.dcm", root / "pipe.png"
    os.symlink(str(root / "deleted-by-someone.dcm"), str(dangling))
    os.mkfifo(str(fifo))
    artifact = make_artifact(tmp_path / "model")
    out = tmp_path / "run"
    summary = run_screen(ScreenConfig(
        model=artifact, inputs=[str(root)], output=str(out), backend="onnxruntime", batch_size=8,
        decode_batch_size=4, rows_per_part=10, actors=(1, 1), progress_every_s=0,
    ))
    rows = read_rows(out).set_index("path")
    assert len(rows) == len(_entries(root)) == summary["rows"]
    for path in (dangling, fifo):
        row = rows.loc[str(path)]
        assert (row["status"], row["error_code"]) == ("error", "read_failed")
        assert str(root) not in row["error"]  # the base name only: folders may carry PHI
