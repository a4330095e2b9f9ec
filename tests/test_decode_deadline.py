"""The per-input decode deadline: a decoder that hangs or spins becomes a ``timeout`` error, not a stall."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cxr_ray.errors import DecodeError
from cxr_ray.io import raster
from cxr_ray.io.deadline import call_with_deadline
from cxr_ray.io.decode import decode_image
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.types import DecodePolicy
from cxr_ray.screen.stages import decode_batch

SHORT = DecodePolicy(max_decode_seconds=0.3)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# The deadline abandons a stalled decoder's thread but cannot stop it. Each test releases its stalled
# decoders when it ends: a spinning thread left behind would hold the GIL for the rest of the session
# and slow every later test in this process many times over.
# A fresh event per test, so a thread of the last test cannot miss its release.
_release = threading.Event()


@pytest.fixture(autouse=True)
def release_stalled_decoders():
    global _release
    _release = release = threading.Event()
    yield
    release.set()


def _hang(*_args, **_kwargs):
    _release.wait(3600)


def _spin(*_args, **_kwargs):
    release = _release
    while not release.is_set():  # pure-Python busy loop: holds the GIL between switch intervals
        pass


def test_default_policy_has_a_deadline_of_a_few_seconds():
    assert 1 <= DecodePolicy().max_decode_seconds <= 30


@pytest.mark.parametrize("stall", [_hang, _spin], ids=["sleeps", "spins"])
def test_a_stalled_decoder_becomes_a_timeout_error(monkeypatch, stall):
    monkeypatch.setattr(raster, "decode_raster", stall)
    with pytest.raises(DecodeError) as caught:
        decode_image(png_bytes(np.zeros((32, 32), np.uint8)), "stuck.png", policy=SHORT)
    assert caught.value.code == "timeout"
    assert "stuck.png" in caught.value.message and "max_decode_seconds" in caught.value.message


def test_normal_files_and_their_errors_are_unchanged_by_the_deadline():
    data = png_bytes((np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64))
    guarded = decode_image(data, "a.png", policy=SHORT)
    direct = decode_image(data, "a.png", policy=DecodePolicy(max_decode_seconds=None))
    np.testing.assert_array_equal(guarded.pixels, direct.pixels)
    with pytest.raises(DecodeError) as caught:
        decode_image(b"not an image at all", "b.png", policy=SHORT)
    assert caught.value.code == "not_an_image"


def test_call_with_deadline_passes_values_and_exceptions_through():
    assert call_with_deadline(lambda: 42, 1.0, "x") == 42
    assert call_with_deadline(lambda: 7, None, "x") == 7
    with pytest.raises(KeyError):
        call_with_deadline(lambda: {}["missing"], 1.0, "x")


def test_load_input_reports_the_timeout_with_the_inputs_name(monkeypatch, tmp_path):
    path = tmp_path / "slow.png"
    path.write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))
    monkeypatch.setattr(raster, "decode_raster", _hang)
    with pytest.raises(DecodeError) as caught:
        load_input(str(path), InputPolicy(decode=SHORT))
    assert caught.value.code == "timeout" and caught.value.message.startswith("slow.png:")


def test_the_decode_stage_writes_a_timeout_row_and_goes_on(monkeypatch, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "hangs.png"
    good.write_bytes(png_bytes(np.full((64, 64), 128, np.uint8)))
    bad.write_bytes(png_bytes(np.full((64, 64), 7, np.uint8)))
    real = raster.decode_raster

    def hang_on_one(data, name, *args, **kwargs):
        if name == "hangs.png":
            _hang()
        return real(data, name, *args, **kwargs)

    monkeypatch.setattr(raster, "decode_raster", hang_on_one)
    table = pa.table({"path": [str(bad), str(good)]})
    out = decode_batch(table, preprocessing={"image_size": 32, "mean": 0.5, "std": 0.25}, policy=SHORT).to_pylist()
    assert [(r["status"], r["error_code"]) for r in out] == [("error", "timeout"), ("ok", None)]


def test_a_decoder_spinning_while_holding_the_gil_is_stopped_by_the_process_backstop(tmp_path):
    """Native code that never releases the GIL freezes the waiting thread too; the faulthandler
    backstop (a C thread) ends the worker, which Ray retries and the isolating pass reports."""
    script = textwrap.dedent(
        f"""
        import re
        import numpy as np
        import pyarrow as pa
        from PIL import Image
        from cxr_ray.io import deadline, raster
        from cxr_ray.io.types import DecodePolicy
        from cxr_ray.screen.stages import decode_batch
        deadline.BACKSTOP_GRACE_S = 0.5
        # catastrophic backtracking: the regex engine runs in C for hours without releasing the GIL
        raster.decode_raster = lambda *a, **k: re.match(r"(a+)+$", "a" * 64 + "b")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save({str(tmp_path / 'x.png')!r})
        decode_batch(pa.table({{"path": [{str(tmp_path / 'x.png')!r}]}}), preprocessing={{"image_size": 8, "mean": 0.5, "std": 0.25}},
                     policy=DecodePolicy(max_decode_seconds=0.3))
        print("survived")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert done.returncode != 0 and "survived" not in done.stdout
    assert re.search(r"Timeout \([\d:.]+\)!", done.stderr), done.stderr[-2000:]


def test_the_backstop_works_where_stderr_has_no_file_descriptor(monkeypatch, tmp_path):
    """pytest's capture or a notebook replaces sys.stderr with a stream faulthandler cannot write to:
    decoding must go on (the dump goes to the process's original stderr)."""
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(np.full((32, 32), 128, np.uint8)))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    out = decode_batch(pa.table({"path": [str(good)]}), preprocessing={"image_size": 16, "mean": 0.5, "std": 0.25},
                       policy=SHORT).to_pylist()
    assert [(r["status"], r["error_code"]) for r in out] == [("ok", None)]
