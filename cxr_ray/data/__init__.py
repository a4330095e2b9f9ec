"""Labelled data sets: listing (folder tree or manifest), decoding to tensors, patient-level
splits, k-fold, duplicate removal, class weights and radiograph augmentation.

Plain Python (pandas, scikit-learn, torch); the Ray Data pipeline that runs
:func:`decode_batch` over a cluster lives in :mod:`cxr_ray.train.ingest`.
"""

from cxr_ray.data.labelled import LabelledSource, decode_batch, read_labelled
from cxr_ray.data.splits import (
    class_weights,
    data_fingerprint,
    deduplicate,
    kfold_assign,
    patient_groups,
    train_val_test_split,
)

__all__ = [
    "LabelledSource",
    "class_weights",
    "data_fingerprint",
    "decode_batch",
    "deduplicate",
    "kfold_assign",
    "patient_groups",
    "read_labelled",
    "train_val_test_split",
]
