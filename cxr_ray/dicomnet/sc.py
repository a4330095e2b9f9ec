"""One heatmap overlay as a DICOM Secondary Capture (highdicom), filed under the source image's study.

What ``--heatmaps flagged --dicom-results`` sends next to the SR, so that a
radiologist sees, in the PACS viewer, where the model looked:

* pixels: the overlay screening draws (:func:`cxr_ray.explain.overlay.overlay_rgb`),
  RGB 8 bit, at the source image's stored size;
* study: the source's (Study Instance UID, patient and study attributes copied
  from its header by highdicom: the one place besides the SR where cxr-ray
  writes real identifiers, README "Patient identifiers");
* series: one of its own per study and model (:data:`~cxr_ray.dicomnet.sr.SC_SERIES_NUMBER`),
  its description naming the model, its version and the explanation method;
* references: Source Image Sequence names the screened instance, with
  ``DERIVED\\SECONDARY`` image type and a derivation description.

UIDs are derived like the SR's (:func:`~cxr_ray.dicomnet.sr.derived_uid`):
the SC's series from the study, model and method, the SC from the source
instance, model and method, so a retried or resumed run replaces, never
duplicates. Optional header values invalid for their VR (a Patient's Sex
``m``) are left out rather than repaired, so the SC validates.
"""

from __future__ import annotations

import copy
import warnings

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cxr_ray.dicomnet.sr import MANUFACTURER, SC_SERIES_NUMBER, Result, derived_uid

BIPED = {v.value for v in hd.PatientOrientationValuesBiped}
SEXES = {v.value for v in hd.PatientSexValues}
LATERALITIES = {v.value for v in hd.LateralityValues}


def sc_series_uid(study_uid: str, result: Result, method: str) -> str:
    """The SC series of one model's heatmaps in one study: the same for every run of that model."""
    return derived_uid(study_uid, result.model_name, result.model_version, method, "sc-series")


def series_description(result: Result, method: str) -> str:
    return f"cxr-ray {result.model_name} {result.model_version} {method} heatmap"[:64]  # LO: 64 characters


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two valid biped values, else None (unknown)."""
    values = [str(v) for v in (source.get("PatientOrientation") or [])]
    return (values[0], values[1]) if len(values) == 2 and set(values) <= BIPED else None


def _header(source: Dataset) -> Dataset:
    header = copy.copy(source)
    if "PatientSex" in header and str(header.PatientSex or "") not in SEXES:
        del header.PatientSex  # highdicom refuses it; Type 2: written empty
    return header


def build_sc(source: Dataset, rgb: np.ndarray, result: Result, method: str) -> hd.sc.SCImage:
    """The Secondary Capture of ``rgb`` (uint8, H x W x 3) for ``result`` on ``source`` (its header)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the overlay must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    header = _header(source)
    orientation = _orientation(header)
    laterality = str(header.get("Laterality", "") or "")
    with warnings.catch_warnings():
        # highdicom's warnings about odd header values quote them (a PatientName, say) into the logs.
        warnings.simplefilter("ignore", UserWarning)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=orientation or ("L", "F"),
            laterality=laterality if laterality in LATERALITIES else None,
            series_instance_uid=sc_series_uid(header.StudyInstanceUID, result, method),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=derived_uid(header.SOPInstanceUID, result.model_name, result.model_version, method, "sc"),
            instance_number=int(header.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER, series_description=series_description(result, method),
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        )
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C: present and empty, as validators want when the body part is not said
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: unknown, not made up (highdicom wants one for PATIENT)
    sc.SourceImageSequence = [_reference(header)]
    sc.DerivationDescription = f"{method} heatmap of the positive class over the screened image"
    return sc


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
