"""Helpers shared by the Serve tests: a tiny real artifact, one Serve HTTP proxy on a
free loopback port for the whole session, and deploying an app and waiting for it.

Imported by ``tests/test_serve*.py`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import httpx

from cxr_ray import testing
from cxr_ray.bench.serve import start_serve
from cxr_ray.testing import CLASSES, IMAGE_SIZE  # noqa: F401 - the serve tests' names for them

_PORT: int | None = None


def make_artifact(directory: Path, *, arch: str = "mobilenet_v2", image_size: int = IMAGE_SIZE) -> Path:
    """A real, randomly initialised artifact (weights + model.json) in ``directory``.

    Batch-norm statistics are estimated on a few random batches first: with the
    initial ones (mean 0, var 1) activations saturate (ReLU6) and the network
    answers the same probabilities for every image, which would make "the
    endpoint returns what the backend computes for this file" a vacuous check.
    """
    return testing.make_artifact(directory, arch=arch, image_size=image_size, name="t", positive_class="covid",
                                 calibrate_bn=True)


def serve_port() -> int:
    """Start Serve's HTTP proxy on 127.0.0.1 once per session (Ray must be initialised)."""
    global _PORT
    if _PORT is None:
        _PORT = start_serve("127.0.0.1", 0)
    return _PORT


def deploy(args, *, name: str, route_prefix: str, timeout_s: float = 180) -> str:
    """Run ``app_builder(args)`` as app ``name`` and wait until ``/healthz`` answers 200."""
    from ray import serve

    from cxr_ray.serve.app import app_builder

    port = serve_port()
    serve.run(app_builder(args), name=name, route_prefix=route_prefix)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"app {name} at {url} not healthy after {timeout_s}s")
        time.sleep(0.5)


@functools.lru_cache(maxsize=4)
def _reference_backend(artifact: str):
    from cxr_ray.engines.load import load_backend
    from cxr_ray.models.artifact import load_card

    return load_card(artifact), load_backend(artifact, "auto")


def reference_probabilities(artifact: Path, data: bytes) -> list[float]:
    """What screening computes for the same bytes: decode -> preprocess -> backend, directly."""
    import numpy as np

    from cxr_ray.io.decode import decode_image
    from cxr_ray.preprocess import preprocess

    card, backend = _reference_backend(str(artifact))
    image = decode_image(data, "reference", target_size=card.image_size)
    return backend.predict(preprocess(image.pixels, card.preprocess_config)[None].astype(np.float32))[0].tolist()
