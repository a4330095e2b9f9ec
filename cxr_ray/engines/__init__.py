"""Inference engines behind one interface: tensorrt | onnxruntime | torch | openvino (and ``auto``).

* :mod:`~cxr_ray.engines.base`: the :class:`Backend` interface every engine's runtime implements;
* :mod:`~cxr_ray.engines.contract`: graph I/O names, the fp32 comparison, the tolerance table;
* :mod:`~cxr_ray.engines.registry`: the engines by name, with their precision rules;
* :mod:`~cxr_ray.engines.cache`: locks, build-once, sha256-checked reads of engine files;
* :mod:`~cxr_ray.engines.load`: :func:`load_backend`, the ``auto`` policy and provisioning;
* :mod:`~cxr_ray.engines.batching`: the opportunistic dynamic batcher of serve and listen (asyncio);
* :mod:`~cxr_ray.engines.verify`: an engine checked against ONNX Runtime fp32 at load (probabilities, AUC);
* one folder per engine: ``runtime.py`` (runs; never imports build code) and ``build.py``.

Importing this package imports none of the engines.
"""
