"""What a person sees on stderr: cxr-ray's own lines by default, Ray's logging with ``--verbose``.

Ray's logging is not muted, it is routed, using Ray's documented switches:

* Ray Data configures its ``ray.data`` logger from the YAML named by
  ``RAY_DATA_LOGGING_CONFIG`` when ``ray.data`` is first imported, in the driver and in every
  worker (a local Ray's workers inherit this process's environment). Quiet mode points it at
  ``ray_data_logging.yaml``: the same file handler as Ray's default (``ray-data.log`` in the
  session's log folder keeps everything), with the console handler raised to ERROR.
* ``ray.init(logging_level=...)`` sets the driver's ``ray`` logger (``Started a local Ray
  instance``, Train's driver-side INFO lines).
* Ray Train's controller and training workers: ``RunConfig(logging_config=LoggingConfig(log_level))``
  (:func:`ray_train_log_level`).
* Other workers' ``ray.train`` loggers (Train's controller and placement-group cleaner warn every
  second while the state API is unavailable, which it is without a dashboard) are set with
  ``runtime_env={"worker_process_setup_hook": ...}``, Ray's hook for configuring worker loggers.
  Worker stdout/stderr still reach the driver (``log_to_driver``): the training loop's own
  per-epoch lines are cxr-ray's progress.

A variable the user set already (``RAY_DATA_LOGGING_CONFIG``) is left alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
QUIET_RAY_DATA_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
# Ray loggers in worker processes that speak on the console about Ray's own machinery.
WORKER_LOGGERS_TO_QUIET = ("ray.train", "ray.tune")
WORKER_LOG_FILE = "cxr-ray-worker-ray-{pid}.log"

_verbose = False


def configure(verbose: bool) -> None:
    """Call once, before Ray is imported: choose the console's level for Ray's logging."""
    global _verbose
    _verbose = verbose
    if not verbose:
        os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(QUIET_RAY_DATA_CONFIG))


def is_verbose() -> bool:
    return _verbose


def ray_init_kwargs(*, local: bool) -> dict[str, Any]:
    """Extra ``ray.init`` arguments for this console mode (empty with ``--verbose``: Ray's defaults).

    The worker hook only for a Ray this process starts: a driver joining a cluster, or running
    inside ``ray job submit``, keeps the runtime environment its operator gave it.
    """
    if _verbose:
        return {}
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if local:
        kwargs["runtime_env"] = {"worker_process_setup_hook": "cxr_ray.console.quiet_worker_loggers"}
    return kwargs


def ray_train_log_level() -> str:
    """For ``RunConfig(logging_config=ray.train.LoggingConfig(...))``: Ray Train's own console level.

    Its system log files keep every level either way; the loop's per-epoch lines are not logging.
    """
    return "INFO" if _verbose else "WARNING"


def quiet_worker_loggers() -> None:
    """Ray's ``worker_process_setup_hook``: Ray's own worker loggers go to a file in the session's logs.

    Not to stderr, which Ray forwards to the driver's console. Errors still reach the console.
    """
    handler: logging.Handler | None = None
    try:
        import ray._private.worker as ray_worker  # the session's log folder has no public accessor

        logs = Path(ray_worker._global_node.get_logs_dir_path())  # type: ignore[attr-defined]
        handler = logging.FileHandler(logs / WORKER_LOG_FILE.format(pid=os.getpid()), delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    except Exception:  # noqa: BLE001 - no session folder: fall back to dropping below ERROR
        handler = None
    for name in WORKER_LOGGERS_TO_QUIET:
        logger = logging.getLogger(name)
        if handler is None:
            logger.setLevel(logging.ERROR)
            continue
        logger.addHandler(handler)
        logger.propagate = False
        errors = logging.StreamHandler()  # errors stay visible, as on the driver
        errors.setLevel(logging.ERROR)
        logger.addHandler(errors)
