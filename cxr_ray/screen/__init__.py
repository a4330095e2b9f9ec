"""Batch screening on Ray Data: an archive in, one Parquet row per input file out.

:func:`~cxr_ray.screen.job.run_screen` with a :class:`~cxr_ray.screen.job.ScreenConfig`
is the library entry point; ``cxr-ray screen`` and ``jobs/screen.py`` wrap it.
Modules, one job each: :mod:`~cxr_ray.screen.config` (the run's record and
its defaults, Ray-free), :mod:`~cxr_ray.screen.resources` (how the cluster is
used, Ray-free), :mod:`~cxr_ray.screen.schema` (output columns and status
codes), :mod:`~cxr_ray.screen.inputs` (streaming listing, resume set),
:mod:`~cxr_ray.screen.stages` (decode / predict / write callables),
:mod:`~cxr_ray.screen.heatmaps` (the optional overlays of flagged rows),
:mod:`~cxr_ray.screen.output` (the output prefix and atomic parts),
:mod:`~cxr_ray.screen.passes` (one Ray Data execution),
:mod:`~cxr_ray.screen.recovery` (rows for inputs that never came back),
:mod:`~cxr_ray.screen.summary` (what is written: resume set, duplicates,
counts, the run summary) and :mod:`~cxr_ray.screen.job` (the run).
Importing this package does not import Ray; config and resources do not either.
"""
