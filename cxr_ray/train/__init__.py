"""Training on Ray Train, one job per module:

* :mod:`~cxr_ray.train.config`: :class:`TrainConfig`, the one configuration record (and the CLI's flags);
* :mod:`~cxr_ray.train.ingest` / :mod:`~cxr_ray.train.prepare`: decode once (Ray Data), classes, starting weights;
* :mod:`~cxr_ray.train.fit`: one ``TorchTrainer.fit`` from a frozen :class:`~cxr_ray.train.plan.WorkerPlan`;
* :mod:`~cxr_ray.train.loop` / :mod:`~cxr_ray.train.steps` / :mod:`~cxr_ray.train.epoch_state`:
  the worker function, its plain-PyTorch steps, and the checkpointed state that resumes it;
* :mod:`~cxr_ray.train.scoring`: probabilities, thresholds and reports after a run;
* :mod:`~cxr_ray.train.protocols`: one run or k-fold CV, sharing one tail (``train(cfg)``);
* :mod:`~cxr_ray.train.evaluation`: ``cxr-ray evaluate`` on another labelled set.

Nothing is imported here eagerly, so ``import cxr_ray.train`` stays cheap.
"""
