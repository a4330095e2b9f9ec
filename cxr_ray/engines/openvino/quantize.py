"""INT8 for the OpenVINO engine: NNCF post-training quantisation of the ONNX graph, calibrated on real images.

The calibration images are the TensorRT int8 path's: a seeded reservoir sample
of the request's ``calibration`` spec (manifest, directory or glob), decoded
and preprocessed as every surface reads an input
(:func:`cxr_ray.engines.tensorrt.calibration.load_calibration_images`).
NNCF's default preset (symmetric int8 weights and activations, fast bias
correction) for the CPU; the quantised model stays in memory and is compiled
like the fp32 graph, then verified against ONNX Runtime fp32 like every
OpenVINO engine. Quantising DenseNet-121 takes of the order of a minute on two
cores, once per process that loads it (nothing is cached yet).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ray.engines.cache import read_verified
from cxr_ray.engines.openvino.runtime import import_openvino
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tensorrt.calibration import load_calibration_images
from cxr_ray.errors import UsageError
from cxr_ray.models.card import ModelCard
from cxr_ray.optional import NNCF_HINT, require

log = logging.getLogger(__name__)


def quantized_model(onnx_path: Path, onnx_sha256: str, card: ModelCard, request: EngineRequest) -> tuple[Any, np.ndarray]:
    """An ``openvino.Model``, the artifact's graph with NNCF int8 quantisation calibrated on
    ``request.calibration``, and the calibration images (what it is then verified on)."""
    if not request.calibration:
        raise UsageError(
            "openvino int8 is calibrated on real images: give a manifest, directory or glob of them "
            "(EngineRequest.calibration, --calibration), as for TensorRT int8"
        )
    nncf = require("nncf", NNCF_HINT)
    images, info = load_calibration_images(request.calibration, card, limit=request.calibration_images,
                                           s3_endpoint=request.s3_endpoint)
    data = read_verified(onnx_path, onnx_sha256, what="ONNX graph", remedy="refusing to quantise a modified model")
    model = import_openvino().Core().read_model(data)
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])  # one image per sample
    quantized = nncf.quantize(model, dataset, subset_size=len(images), target_device=nncf.TargetDevice.CPU)
    log.info("openvino int8: NNCF calibrated on %d images of %s (%d skipped)", info["images"],
             request.calibration, info["skipped"])
    return quantized, images
