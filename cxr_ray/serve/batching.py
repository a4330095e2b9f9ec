"""Serve's dynamic batcher: :class:`cxr_ray.engines.batching.OpportunisticBatcher`, re-exported.

It lives in :mod:`cxr_ray.engines` because ``cxr-ray listen`` (in :mod:`cxr_ray.dicomnet`, below serve in
the layer contract) batches its instances with the same class.
"""

from __future__ import annotations

from cxr_ray.engines.batching import OpportunisticBatcher

__all__ = ["OpportunisticBatcher"]
