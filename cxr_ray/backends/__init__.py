"""Inference backends behind one interface: tensorrt | onnxruntime | torch (and auto)."""

from cxr_ray.backends.base import Backend, InputSpec
from cxr_ray.backends.select import load_backend

__all__ = ["Backend", "InputSpec", "load_backend"]
