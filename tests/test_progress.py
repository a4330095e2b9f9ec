"""cxr-ray's progress line (cxr_ray/progress.py): what a person reads on stderr, for a known sequence.

A hand-wound clock drives it, so the figures are exact and no test depends on how fast this machine is.
"""

from __future__ import annotations

import io
import json

import pytest

from cxr_ray.progress import (
    ERASE_TO_END,
    RATE_WINDOW_S,
    ProgressLine,
    epoch_eta,
    format_duration,
    format_rate,
    stage,
    stages,
)
from cxr_ray.screen.pass_progress import STILL_LISTING, PassProgress
from cxr_ray.train.loop import _progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (7.4, "7s"), (59.6, "1m00s"), (185, "3m05s"),
                                               (7440, "2h04m"), (-1, "?"), (float("inf"), "?")])
def test_durations_read_short(seconds, text):
    assert format_duration(seconds) == text


def test_rates_keep_two_decimals_below_one_per_second():
    assert format_rate(41.23, "images") == "41.2 images/s"
    assert format_rate(0.0812, "batches") == "0.08 batches/s"
    assert format_rate(0.0, "images") == "? images/s"


def test_plain_lines_carry_done_total_rate_eta_and_counts():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine("screen", total=100, every_s=10, stream=out, tty=False, clock=clock)
    clock.now += 5
    line.update(20, counts={"ok": 18, "error": 2})  # first update: shown at once
    clock.now += 5
    line.update(40, counts={"ok": 37, "error": 3})  # 5 s after the last line: not yet
    clock.now += 5
    line.update(60, counts={"ok": 56, "error": 4})  # 10 s after: shown
    clock.now += 5
    line.update(100, counts={"ok": 95, "error": 5})
    line.finish()
    lines = out.getvalue().splitlines()
    assert lines == [
        "screen: 20/100 images (20%) ? images/s ETA ? | ok 18 error 2",  # the rate starts at the first items
        "screen: 60/100 images (60%) 4.0 images/s ETA 10s | ok 56 error 4",
        "screen: 100/100 images (100%) 5.0 images/s done in 20s | ok 95 error 5",
    ]
    assert "\r" not in out.getvalue()  # a log file gets lines, not carriage returns


def test_the_rate_is_over_the_recent_window_not_the_whole_run():
    clock = Clock()
    line = ProgressLine("bench", total=1000, every_s=0, clock=clock)
    clock.now += 100  # a slow start (actors loading): 10 items in 100 s
    line.update(10)
    for _ in range(int(RATE_WINDOW_S) + 10):  # then 10 items/s
        clock.now += 1
        line.update(line.done + 10)
    assert line.rate() == pytest.approx(10.0)
    text = line.text()
    assert "10.0 images/s" in text and f"ETA {format_duration((1000 - line.done) / 10)}" in text


def test_an_unknown_total_is_said_with_no_eta():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine("screen", every_s=1, stream=out, tty=False, clock=clock, unknown_total="total not known yet")
    clock.now += 2
    line.update(8, counts={"ok": 8})
    clock.now += 2
    line.update(16, counts={"ok": 16})
    assert out.getvalue().splitlines()[-1] == "screen: 16 images, total not known yet 4.0 images/s | ok 16"


def test_a_terminal_gets_one_line_rewritten_in_place():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine("screen", total=4, every_s=15, stream=out, tty=True, clock=clock)
    for done in range(1, 5):
        clock.now += 1
        line.update(done)
    line.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("done in 4s" + ERASE_TO_END + "\n")
    # updates 1-3 (1 s apart, over the TTY refresh) and the final line; 4/4 is the final line's alone
    assert text.count("\r") == 4 and text.count("4/4") == 1


def test_the_final_count_is_said_once_by_the_final_line_when_the_last_update_completes_the_total():
    """A small screen: every row comes back in one batch, the listing's total already known."""
    clock, out = Clock(), io.StringIO()
    progress = PassProgress(out, 15, "run-1", "screen", listing_total=lambda: 16, clock=clock)
    progress.begin("starting")
    clock.now += 11
    status = {"ok": 16, "error": 0, "skipped": 0, "flagged": 2}
    progress.written(16, status)  # the first update, shown at once were it not the last
    progress.end(16, status)
    assert out.getvalue().splitlines() == [
        "screen: starting",
        "screen: 16/16 images (100%) 1.5 images/s done in 11s | ok 16 error 0 skipped 0 flagged 2",
    ]
    events = io.StringIO()
    as_json = PassProgress(events, 15, "run-1", "screen", listing_total=lambda: 16, json_lines=True, clock=clock)
    as_json.written(16, status)
    as_json.end(16, status)
    assert [json.loads(line)["final"] for line in events.getvalue().splitlines()] == [True]


def test_zero_interval_turns_the_line_off():
    out = io.StringIO()
    line = ProgressLine("screen", total=3, every_s=0, stream=out, tty=False)
    line.update(3)
    line.finish()
    assert out.getvalue() == ""


def test_stages_are_announced_only_while_a_verb_listens():
    stage("nobody listens")  # a library call outside any verb: silent, no error
    out = io.StringIO()
    with stages("export", stream=out, tty=False):
        stage("tracing the network to ONNX")
        stage("verifying against PyTorch")
    lines = out.getvalue().splitlines()
    assert [ln.split("...")[0] for ln in lines[:2]] == ["export: tracing the network to ONNX",
                                                        "export: verifying against PyTorch"]
    assert lines[2].startswith("export: done in ") and len(lines) == 3
    failed = io.StringIO()
    with pytest.raises(RuntimeError), stages("export", stream=failed, tty=False):
        stage("tracing")
        raise RuntimeError("boom")
    assert failed.getvalue().splitlines() == [failed.getvalue().splitlines()[0]]  # no "done" after a failure


def test_screen_pass_reads_the_listing_total_when_it_appears_and_speaks_json_on_request():
    clock, out = Clock(), io.StringIO()
    listing: list[int | None] = [None]
    progress = PassProgress(out, 1, "run-1", "screen", listing_total=lambda: listing[0], clock=clock)
    progress.begin("starting")
    clock.now += 2
    progress.written(10, {"ok": 9, "error": 1, "skipped": 0, "flagged": 3})
    listing[0] = 30
    clock.now += 3
    progress.end(30, {"ok": 27, "error": 2, "skipped": 1, "flagged": 8})
    starting, first, last = out.getvalue().splitlines()
    assert starting == "screen: starting"
    assert STILL_LISTING in first and "ETA" not in first  # the first update is shown at once
    assert last == "screen: 30/30 images (100%) 6.0 images/s done in 5s | ok 27 error 2 skipped 1 flagged 8"

    events = io.StringIO()
    as_json = PassProgress(events, 1, "run-1", "isolate", listing_total=lambda: 5, json_lines=True)
    as_json.begin("starting")  # prose: not for a collector
    as_json.end(5, {"ok": 5, "error": 0, "skipped": 0, "flagged": 1})
    event = json.loads(events.getvalue())
    assert event["event"] == "progress" and event["pass"] == "isolate" and event["final"] is True
    assert (event["rows"], event["total"], event["ok"], event["flagged"]) == (5, 5, 5, 1)


def test_training_epochs_get_an_eta_at_the_last_epochs_pace():
    assert epoch_eta(2, 10, 15.0) == "ETA 2m00s"
    assert epoch_eta(10, 10, 15.0) == "done"


def test_a_training_epoch_line_says_epoch_k_of_n_rate_and_eta():
    """The line rank 0 prints after each epoch."""
    row = {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "lr": 1e-3, "seconds": 15.0, "images_per_s": 40.0}
    line = _progress_line("fold 1/5", row, 10, is_better=False)
    assert line.startswith("[fold 1/5] epoch 2/10 ") and "15.0s 40 img/s ETA 2m00s" in line


def test_start_up_before_the_first_items_is_not_in_the_rate():
    clock = Clock()
    line = ProgressLine("screen", total=100, every_s=0, clock=clock)
    clock.now += 60  # actors loading: nothing done for a minute
    line.update(10)
    clock.now += 2
    line.update(30)
    assert line.rate() == pytest.approx(10.0) and "ETA 7s" in line.text()
