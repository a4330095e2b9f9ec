"""How a request's bytes become the model's input: on the CPU, or on the replica's GPU (``decode``).

``ServeArgs.decode`` (``--decode`` of ``cxr-ray serve``):

* ``cpu``: :func:`~cxr_ray.io.inputs.load_input` + :func:`~cxr_ray.preprocess.preprocess`, what
  screening's CPU stage runs;
* ``gpu``: :class:`~cxr_ray.io.gpu.decode.GpuDecoder` on the GPU that holds the model, in the
  fused topology only (the replica that decodes is the one with the model); the (1, S, S) tensor
  stays on the device into the batched model call. Refused at start without a GPU backend or
  nvImageCodec;
* ``auto``: ``gpu`` where the replica's model runs on a GPU, else ``cpu``; where the GPU decoder
  cannot start there, every response says why in ``warnings``.

Inputs the GPU codecs do not take are decoded on the CPU and say so in ``warnings``.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cxr_ray.errors import BackendUnavailableError, DecodeError
from cxr_ray.io.gpu.decode import CPU_NOTE, DeviceImage, GpuDecoder, open_gpu_decoder
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.types import ImageMetadata
from cxr_ray.preprocess import PreprocessConfig, preprocess, preprocess_tensor


class RequestDecoder:
    """Bytes -> (model input, metadata, decoded pixels for an overlay) on the CPU or the model's GPU."""

    def __init__(self, mode: str, reading: InputPolicy, config: PreprocessConfig,
                 model_device: torch.device | None = None) -> None:
        """``model_device``: the fused replica's backend device when it is a GPU (None otherwise)."""
        self.reading, self.config = reading, config
        self.gpu: GpuDecoder | None = None
        self.note: str | None = None  # why auto decodes on the CPU on a GPU replica
        if mode == "gpu" and model_device is None:
            raise BackendUnavailableError(
                "decode=gpu decodes on the GPU that runs the model; this replica's model runs on the CPU "
                "(give it a GPU and a GPU backend, or use decode auto / cpu)")
        if mode != "cpu" and model_device is not None:
            self.gpu, why = open_gpu_decoder(mode, reading, model_device)
            self.note = None if why is None else CPU_NOTE + why
        self._lock = threading.Lock()  # one decoder, its codec and its CUDA work: one request at a time

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    def decode(self, data: bytes, name: str) -> tuple[Any, ImageMetadata, Any]:
        """(model input (1, S, S), metadata, decoded (H, W) pixels): numpy arrays on the CPU path,
        tensors on the model's GPU on the GPU path; raises only :class:`DecodeError`."""
        if self.gpu is None:
            image = load_input("request", self.reading, data=data, name=name).image
            meta = image.meta if self.note is None else _noted(image.meta, self.note)
            return preprocess(image.pixels, self.config), meta, image.pixels
        with self._lock:
            result = self.gpu.decode(["request"], data=[data], names=[name])[0]
            if isinstance(result, DecodeError):
                raise result
            pixels = result.pixels if isinstance(result, DeviceImage) else torch.from_numpy(result.pixels)
            tensor = preprocess_tensor(pixels.to(self.gpu.device), self.config)
        return tensor, result.meta, pixels


def host_pixels(pixels: Any) -> np.ndarray:
    """Decoded pixels on the host (an overlay is drawn there), wherever they were decoded."""
    return pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels


def _noted(meta: ImageMetadata, note: str) -> ImageMetadata:
    return replace(meta, warnings=(*meta.warnings, note))
