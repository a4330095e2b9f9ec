"""Inference backends behind one interface: tensorrt | onnxruntime | torch (and auto)."""

from cxr_ray.backends.base import Backend, InputSpec

__all__ = ["Backend", "InputSpec"]
