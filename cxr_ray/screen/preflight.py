"""What the screening driver checks before Ray starts any task or actor (``cxr-ray screen``, ``bench screen``).

The artifact is whole, the output prefix is writable and the engine can run
at the asked precision on the workers' hardware: each failure is one error
line, instead of every actor failing on it in turn with its traceback.
"""

from __future__ import annotations

import os

import ray
import torch

from cxr_ray.engines.preflight import check_engine
from cxr_ray.errors import UsageError
from cxr_ray.io.storage import check_writable
from cxr_ray.models.artifact import verify_artifact
from cxr_ray.models.card import ModelCard
from cxr_ray.screen.config import ScreenConfig


def joins_a_cluster(address: str | None) -> bool:
    """Whether :func:`cxr_ray.ray_session.connect` will join an existing cluster (else: Ray on this machine)."""
    return bool(ray.is_initialized() or address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def check_inputs_and_output(config: ScreenConfig) -> ModelCard:
    """The artifact and the output, checked before Ray is even started; returns the card."""
    card = verify_artifact(config.model, config.s3_endpoint)
    check_writable(config.output, config.s3_endpoint)
    return card


def check_hardware(config: ScreenConfig, gpus: float, *, local: bool) -> None:
    """The engine, precision and GPU request against the workers' ``gpus`` (``local``: this machine's CPU)."""
    if config.gpus_per_actor and gpus <= 0:
        raise UsageError(f"--gpus-per-actor {config.gpus_per_actor:g}: the cluster has no GPUs, so the predict "
                         "actors would wait for one forever; drop the flag or run on a GPU cluster")
    per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else gpus
    check_engine(config.backend, config.precision, gpus=per_actor, local=local, calibration=config.calibration)


def check_local_hardware(config: ScreenConfig) -> None:
    """Ray will start on this machine: its GPUs and CPU are the workers', checked before it starts."""
    check_hardware(config, float(torch.cuda.device_count()), local=True)


def check_cluster_hardware(config: ScreenConfig) -> None:
    """Joined a cluster: checked against its resources before the first task is submitted."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    one_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1  # then its CPU is the workers' CPU
    check_hardware(config, gpus, local=one_node)
