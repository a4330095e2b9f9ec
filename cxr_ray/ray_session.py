"""Joining Ray, the same way for every command (train, evaluate, screen, benches).

Ray is imported inside the functions: the CLI imports this module to build its parsers, and
``cxr-ray --help`` must not start Ray.
"""

from __future__ import annotations

import os

from cxr_ray.console import ray_init_kwargs


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
        ray.init(address=address, **ray_init_kwargs(local=False))
    elif os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", **ray_init_kwargs(local=False))
    else:
        ray.init(address="local", include_dashboard=False, **ray_init_kwargs(local=True))  # never join a stray cluster by accident
    return True


def quiet_ray_data() -> None:
    """Ray Data progress bars would drown the per-epoch lines on stderr (train, evaluate, bench train)."""
    from ray.data import DataContext  # lazily, as above

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
