"""The console: Ray's logging routed to its files unless --verbose, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from _screen_testing import REPO_ROOT, run_tree

from cxr_ray import cli, console
from cxr_ray.synth import generate_archive


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_quiet_mode_points_ray_data_at_a_config_whose_console_shows_errors_only(monkeypatch):
    monkeypatch.delenv(console.RAY_DATA_LOGGING_ENV, raising=False)
    console.configure(verbose=False)
    path = os.environ[console.RAY_DATA_LOGGING_ENV]
    assert path == str(console.QUIET_RAY_DATA_CONFIG)
    # Ray Data itself loads the file at import (a fresh process, as a CLI run or a local worker is).
    out = _run(
        """
        import json, logging
        import ray.data  # noqa: F401 - configures the ray.data logger from RAY_DATA_LOGGING_CONFIG
        handlers = logging.getLogger("ray.data").handlers
        print(json.dumps({type(h).__name__: logging.getLevelName(h.level) for h in handlers}))
        """,
        **{console.RAY_DATA_LOGGING_ENV: path},
    ).stdout
    levels = json.loads(out)
    assert levels["PlainRayHandler"] == "ERROR"  # the console
    assert levels["SessionFileHandler"] == "NOTSET"  # ray-data.log keeps everything


def test_verbose_mode_and_a_users_own_config_are_left_alone(monkeypatch):
    monkeypatch.setenv(console.RAY_DATA_LOGGING_ENV, "/etc/my-ray-data-logging.yaml")
    console.configure(verbose=False)
    assert os.environ[console.RAY_DATA_LOGGING_ENV] == "/etc/my-ray-data-logging.yaml"
    monkeypatch.delenv(console.RAY_DATA_LOGGING_ENV)
    console.configure(verbose=True)
    try:
        assert console.RAY_DATA_LOGGING_ENV not in os.environ
        assert console.ray_init_kwargs(local=True) == {}
    finally:
        console.configure(verbose=False)
    quiet = console.ray_init_kwargs(local=True)
    assert quiet["runtime_env"]["worker_process_setup_hook"] == "cxr_ray.console.quiet_worker_loggers"
    assert "runtime_env" not in console.ray_init_kwargs(local=False)  # a cluster's runtime env is its operator's


def test_quiet_mode_has_the_driver_skip_ray_trains_preemption_watcher_line_and_nothing_else(monkeypatch):
    from ray._private.ray_logging import LogDeduplicator  # where the driver prints worker output

    monkeypatch.delenv(console.SKIP_WORKER_LINES_ENV, raising=False)
    console.configure(verbose=True)
    assert console.SKIP_WORKER_LINES_ENV not in os.environ  # --verbose: every line
    console.configure(verbose=False)
    pattern = os.environ[console.SKIP_WORKER_LINES_ENV]
    # The line as a worker's stderr holds it (copied from a real `cxr-ray train`), and two that must stay.
    watcher = ("[2026-12-07 17:05:35,804 E 2980 3007] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: 'a113cde315a0ff24365bb90e01000000' has constructor arguments in "
               "the object store and max_restarts > 0. If the arguments in the object store go out of scope "
               "or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727")
    epoch = "[fold 1/5] epoch 1/40 train_loss=1.1911 train_acc=0.493 8.0s 56 img/s ETA 5m12s *"
    crash = "[2026-12-07 17:05:36,001 E 2980 3007] core_worker.cc:812: The worker died unexpectedly"
    printed = LogDeduplicator(5, None, pattern).deduplicate({"ip": "127.0.0.1", "pid": 2980,
                                                             "lines": [watcher, epoch, crash]})
    assert [line for batch in printed for line in batch["lines"]] == [epoch, crash]
    # the raylet's line as `cxr-ray demo` printed it when Serve shut down, and another task failure
    shutdown = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
                "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    other = "Task Predictor.__call__ failed. There are 3 retries remaining, so the task will be retried."
    printed = LogDeduplicator(5, None, pattern).deduplicate({"ip": "127.0.0.1", "pid": "raylet",
                                                             "lines": [shutdown, other]})
    assert [line for batch in printed for line in batch["lines"]] == [other]
    monkeypatch.setenv(console.SKIP_WORKER_LINES_ENV, "mine")
    console.configure(verbose=False)
    assert os.environ[console.SKIP_WORKER_LINES_ENV] == "mine"  # the user's own regex is left alone


def test_the_worker_hook_keeps_ray_train_warnings_off_stderr_but_not_errors():
    done = _run(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)  # stands in for the worker's stderr
        from cxr_ray.console import quiet_worker_loggers
        quiet_worker_loggers()  # no Ray session here: the fallback drops below ERROR
        log = logging.getLogger("ray.train.v2._internal.execution.controller")
        log.warning("Failed to query Ray Train Controller actor state.")
        log.error("a real failure")
        # Ray Train names this logger by its file path; its per-epoch INFO line went to the root's console.
        import ray.train.v2._internal.execution.context as train_context
        logging.getLogger(train_context.__file__).info("Reporting training result 1: TrainingReport(...)")
        import warnings
        from ray.util.annotations import RayDeprecationWarning
        warnings.warn_explicit("ExecutionOptions.exclude_resources is deprecated", RayDeprecationWarning,
                               "execution_options.py", 436, module="ray.data._internal.execution.interfaces")
        warnings.warn_explicit("a deprecated call of cxr-ray's own", RayDeprecationWarning,
                               "loop.py", 1, module="cxr_ray.train.loop")
        """,
        PYTHONWARNINGS="",  # Ray's own filter shows its deprecation warnings only without warning options
    )
    out = done.stdout + done.stderr  # importing ray gives the "ray" loggers their own stderr handler
    assert "Failed to query" not in out and "a real failure" in out
    assert "Reporting training result" not in out
    assert "exclude_resources" not in out  # raised inside Ray, about Ray's own call
    assert "a deprecated call of cxr-ray's own" in out  # only Ray's modules are filtered


def test_an_unexpected_error_is_one_line_and_the_traceback_comes_with_verbose(monkeypatch, capsys):
    from cxr_ray.commands import synth

    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "run", broken)
    assert cli.main(["synth", "/nonexistent/never-written"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert error["error"] == "unexpected" and error["message"] == "RuntimeError: disk on fire"
    assert "--verbose" in error["hint"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["synth", "/nonexistent/never-written", "--verbose"])
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--verbose", "synth", "/nonexistent/never-written"])
    console.configure(verbose=False)


def test_quiet_mode_drops_rays_auth_enabled_notice_but_not_its_auth_disabled_warning(caplog):
    import logging

    name = console.DRIVER_NOTICES_TO_DROP[0][0]
    enabled = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    disabled = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    try:
        for verbose, expected in ((False, [disabled]), (True, [enabled, disabled])):
            console.configure(verbose=verbose)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger=name):
                logging.getLogger(name).warning(enabled)
                logging.getLogger(name).warning(disabled)
            assert [r.getMessage() for r in caplog.records if r.name == name] == expected
    finally:
        console.configure(verbose=False)


@pytest.mark.slow
def test_a_train_run_shows_its_epoch_lines_and_not_ray_trains_internals(tmp_path):
    """A real ``cxr-ray train`` in its own process and its own local Ray, as a user runs it.

    The session's Ray does not forward worker output (``log_to_driver=False``), so only a run of
    its own shows what reaches the console: Ray Train's per-epoch ``Reporting training result``,
    Ray Data's deprecation warning about Ray Train's own call and the C++ PreemptionWatcher line
    used to, on every run.
    """
    generate_archive(str(tmp_path / "phantoms"), n=60, formats=("png",), seed=3, size=64)
    env = {k: v for k, v in os.environ.items()  # no warning options, no cluster, no console overrides
           if k not in ("PYTHONWARNINGS", "RAY_ADDRESS", console.SKIP_WORKER_LINES_ENV, console.RAY_DATA_LOGGING_ENV)}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout, in workers too
    done = run_tree([
        sys.executable, "-m", "cxr_ray", "train", "--data", str(tmp_path / "phantoms" / "labels.csv"),
        "--arch", "resnet18", "--mode", "scratch", "--epochs", "2", "--image-size", "32", "--batch-size", "16",
        "--no-augment", "--num-workers", "1", "--cpus-per-worker", "1", "--n-bootstrap", "20",
        "--out", str(tmp_path / "model"), "--storage-path", str(tmp_path / "runs"),
    ], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    err = done.stderr
    assert re.search(r"epoch 1/2 train_loss=\S+ .* ETA ", err) and re.search(r"epoch 2/2 train_loss=\S+ .* done", err)
    for internal in ("Reporting training result", "RayDeprecationWarning", "PreemptionWatcher", "core_worker.cc",
                     "Token authentication is enabled"):
        assert internal not in err, f"{internal!r} on stderr:\n{err[-4000:]}"
