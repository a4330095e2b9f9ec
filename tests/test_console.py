"""The console: Ray's logging routed to its files unless --verbose, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cxr_ray import cli, console


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
        """
    )
    out = done.stdout + done.stderr  # importing ray gives the "ray" loggers their own stderr handler
    assert "Failed to query" not in out and "a real failure" in out


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
