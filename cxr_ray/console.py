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
* The same hook routes the loggers two Ray Train modules name by their file path
  (``logging.getLogger(__file__)``, :data:`RAY_TRAIN_FILE_LOGGERS`): being outside ``ray.train``,
  LoggingConfig does not reach them and they propagate to the root logger, which Train points at
  the console at INFO in its workers (``Reporting training result N: TrainingReport(...)`` after
  every epoch). The hook runs before Train's ``dictConfig``, which leaves such loggers as they are.
* The hook also ignores ``RayDeprecationWarning`` raised inside Ray's own modules (Ray Train's
  DatasetManager builds ``ExecutionOptions(exclude_resources=...)``, which Ray Data warns about):
  nothing a user of cxr-ray can act on. A deprecated call in cxr-ray's code is attributed to
  cxr-ray's module and still warns.
* Ray's C++ core logs at ERROR, to the worker's stderr, that Train's ``PreemptionWatcher`` actor
  "has constructor arguments in the object store and max_restarts > 0": Ray's own design
  (ray-project/ray#53727), not a failure. ``RAY_BACKEND_LOG_LEVEL`` could only hide it with
  every other C++ error, so the one line is dropped where the driver prints worker output, with
  Ray's documented ``RAY_DEDUP_LOGS_SKIP_REGEX`` (read when the driver imports Ray); the worker's
  ``.err`` file in the session's logs keeps it.
* The driver's ``ray._private.authentication.authentication_token_setup`` logger tells, at
  WARNING, on every local start, that token authentication is *enabled* (Ray 2.60's default for a
  local cluster, which cxr-ray keeps): a filter on that one logger drops that notice
  (:data:`DRIVER_NOTICES_TO_DROP`). Its warning that authentication is *disabled* still shows.

A variable the user set already (``RAY_DATA_LOGGING_CONFIG``, ``RAY_DEDUP_LOGS_SKIP_REGEX``) is
left alone.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
QUIET_RAY_DATA_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
# Ray loggers in worker processes that speak on the console about Ray's own machinery.
WORKER_LOGGERS_TO_QUIET = ("ray.train", "ray.tune")
# Ray Train modules whose logger is named by the module's file path, relative to the ray package.
RAY_TRAIN_FILE_LOGGERS = (("train", "v2", "_internal", "execution", "context.py"),
                          ("train", "collective", "collectives.py"))
WORKER_LOG_FILE = "cxr-ray-worker-ray-{pid}.log"
# Worker output lines the driver does not print (Ray's RAY_DEDUP_LOGS_SKIP_REGEX, a regex search).
SKIP_WORKER_LINES_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
# The second: the raylet's note, when Serve shuts down, that the controller it just killed missed
# its graceful_shutdown call (retried "infinitely" until the cluster stops a moment later).
SKIP_WORKER_LINES = ("Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor "
                     "arguments in the object store and max_restarts > 0"
                     "|Task ServeController.graceful_shutdown failed. There are infinite retries remaining")

# Driver-side Ray notices that say all is as it should be: (logger, message prefix).
DRIVER_NOTICES_TO_DROP = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
)

_verbose = False


class _DropNotice(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# One filter object per notice: adding it again is a no-op (Logger.addFilter), removing it undoes it.
_NOTICE_FILTERS = [(logging.getLogger(name), _DropNotice(prefix)) for name, prefix in DRIVER_NOTICES_TO_DROP]


def configure(verbose: bool) -> None:
    """Call once, before Ray is imported: choose the console's level for Ray's logging."""
    global _verbose
    _verbose = verbose
    for logger, notice in _NOTICE_FILTERS:  # configure() may run more than once in a process (tests)
        (logger.removeFilter if verbose else logger.addFilter)(notice)
    if not verbose:
        os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(QUIET_RAY_DATA_CONFIG))
        os.environ.setdefault(SKIP_WORKER_LINES_ENV, SKIP_WORKER_LINES)


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


def ray_train_file_loggers() -> list[str]:
    """The names of :data:`RAY_TRAIN_FILE_LOGGERS`: their ``__file__``, found without importing Ray Train.

    A submodule's ``__file__`` is its package's ``__path__`` joined with the relative path, so the
    names match in every worker, whatever the installation.
    """
    import ray  # already imported in a Ray worker; the hook is not called elsewhere

    return [os.path.join(ray.__path__[0], *parts) for parts in RAY_TRAIN_FILE_LOGGERS]


def quiet_worker_loggers() -> None:
    """Ray's ``worker_process_setup_hook``: Ray's own worker loggers go to a file in the session's logs.

    Not to stderr, which Ray forwards to the driver's console. Errors still reach the console.
    Ray's deprecation warnings about its own calls are ignored (see the module doc).
    """
    from ray.util.annotations import RayDeprecationWarning

    # Inserted before Ray's own "module" filter for the category, so this one applies first.
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"ray\.")
    handler = _session_log_handler()
    for name in (*WORKER_LOGGERS_TO_QUIET, *ray_train_file_loggers()):
        logger = logging.getLogger(name)
        if handler is None:
            logger.setLevel(logging.ERROR)
            continue
        logger.addHandler(handler)
        logger.propagate = False
        errors = logging.StreamHandler()  # errors stay visible, as on the driver
        errors.setLevel(logging.ERROR)
        logger.addHandler(errors)


def _session_log_handler() -> logging.Handler | None:
    """A file handler in this Ray session's log folder (None outside a Ray session)."""
    try:
        import ray._private.worker as ray_worker  # the session's log folder has no public accessor

        logs = Path(ray_worker._global_node.get_logs_dir_path())  # type: ignore[attr-defined]
        handler = logging.FileHandler(logs / WORKER_LOG_FILE.format(pid=os.getpid()), delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    except Exception:  # noqa: BLE001 - no session folder: fall back to dropping below ERROR
        return None
    return handler
