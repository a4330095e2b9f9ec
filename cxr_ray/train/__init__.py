"""Training on Ray Train: ingest (Ray Data decode cache), the per-worker loop, the driver.

``from cxr_ray.train.runner import train`` runs what ``cxr-ray train`` runs;
:class:`cxr_ray.train.config.TrainConfig` is its one configuration record.
Nothing is imported here eagerly, so ``import cxr_ray.train`` stays cheap.
"""
