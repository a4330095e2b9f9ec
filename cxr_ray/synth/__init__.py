"""Phantom chest X-ray archives: learnable classes, lesion masks, realistic DICOM, broken files.

``generate_archive`` writes one (see :mod:`cxr_ray.synth.archive`); ``cxr-ray
synth`` is its command line. Drawing lives in :mod:`~cxr_ray.synth.phantom`,
class patterns in :mod:`~cxr_ray.synth.patterns`, file encoders in
:mod:`~cxr_ray.synth.writers`.
"""

from cxr_ray.synth.archive import CORRUPT_KINDS, LABEL_COLUMNS, generate_archive, summarize
from cxr_ray.synth.patterns import Pattern, assign_patterns

__all__ = ["CORRUPT_KINDS", "LABEL_COLUMNS", "Pattern", "assign_patterns", "generate_archive", "summarize"]
