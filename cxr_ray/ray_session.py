"""Joining Ray, the same way for every command (train, evaluate, screen, benches)."""

from __future__ import annotations

import os


def connect(address: str | None = None) -> bool:
    """Join a Ray cluster; True when this call initialised Ray (the caller shuts it down).

    Order: an already initialised Ray (tests, notebooks); ``address``;
    ``RAY_ADDRESS`` or running inside a Ray job -> ``address="auto"``;
    otherwise a local embedded Ray on this machine (no dashboard: start one
    with ``ray start --head`` and pass ``--address`` to get it).
    """
    import ray  # lazily: the CLI imports this module for --help

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto")
    else:
        ray.init(address="local", include_dashboard=False)  # never join a stray cluster by accident
    return True
