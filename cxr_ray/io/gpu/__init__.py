"""Decoding on the GPU: nvImageCodec for the compressed frames, torch ops for the values.

* :mod:`~cxr_ray.io.gpu.mode`: ``--decode gpu|cpu|auto`` (light: the CLI builds its flags from it);
* :mod:`~cxr_ray.io.gpu.values`: the CPU path's value steps as torch ops (LUT, VOI, MONOCHROME1);
* :mod:`~cxr_ray.io.gpu.routes`: which inputs a GPU codec takes, and why the others go to the CPU;
* :mod:`~cxr_ray.io.gpu.codec`: the nvImageCodec decoder (imported lazily, with an install hint);
* :mod:`~cxr_ray.io.gpu.decode`: :class:`~cxr_ray.io.gpu.decode.GpuDecoder`, a batch of inputs in,
  tensors on the device (or the CPU decoder's images, per input, with the reason) out.

Importing this package imports neither torch nor nvImageCodec.
"""
