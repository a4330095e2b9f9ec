"""One screening result as a DICOM Comprehensive SR (highdicom), filed under the source image's study.

Template: TID 1500 "Measurement Report" with one TID 1501 "Measurements and
Qualitative Evaluations" group, as highdicom builds them:

* algorithm identification: the model's name and version (``model.json``);
* source image: the screened instance (SOP Class + Instance UID), and the SR's
  evidence references its study and series, so a viewer shows it with them;
* qualitative evaluations: ``Finding`` (DCM 121071) = the predicted class,
  and ``Flagged for review`` = SNOMED CT Yes / No;
* measurements: the positive-class ``Score`` and the operating ``Threshold``
  (UCUM ``1``, no units).

Classes, score, threshold and flag are this tool's own concepts, so they are
coded in a private scheme, :data:`SCHEME` (version 1), documented here and
in the README; the finding's code value is the class name as in the model card.

Patient and study attributes are copied from the source header by highdicom
(the SR is part of the patient's study): the one place where cxr-ray writes
real identifiers (README "Patient identifiers"). A copied optional value
that is invalid for its VR (Patient's Age ``62`` instead of ``062Y``, as in
a real RSNA sample) is left out rather than repaired, so the SR validates.

UIDs are derived from the source instance and the model version (the SR's
series: from the study and the model version), so writing the result of the
same screening twice (a retried batch, a resumed run) gives the same objects:
an archive stores them once.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

SCHEME = "99CXRRAY"  # private coding scheme (PS3.16 8.2: "99" prefix), version 1
MANUFACTURER = "cxr-ray"
SR_SERIES_NUMBER = 9901  # a series of its own, after the acquisition's
SC_SERIES_NUMBER = 9902
FLAGGED = hd.sr.CodedConcept("flagged", SCHEME, "Flagged for review")
SCORE = hd.sr.CodedConcept("score", SCHEME, "Positive-class score")
THRESHOLD = hd.sr.CodedConcept("threshold", SCHEME, "Operating threshold")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
TRACKING = "cxr-ray screening"


@dataclass(frozen=True)
class Result:
    """What the SR says: exactly the Parquet row's values."""

    predicted_label: str
    score: float | None
    threshold: float
    flagged: bool | None
    model_name: str
    model_version: str
    positive_class: str | None = None


def finding_code(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(label[:16], SCHEME, label)


def _group(source: pydicom.Dataset, result: Result) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.Finding, finding_code(result.predicted_label))]
    if result.flagged is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(FLAGGED, codes.SCT.Yes if result.flagged else codes.SCT.No))
    measurements = [hd.sr.Measurement(THRESHOLD, float(result.threshold), codes.UCUM.NoUnits, algorithm_id=algorithm)]
    if result.score is not None:
        measurements.insert(0, hd.sr.Measurement(SCORE, float(result.score), codes.UCUM.NoUnits, algorithm_id=algorithm))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, result.model_version, "tracking"), identifier=TRACKING),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


TYPE2_STUDY = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "PatientName",
               "PatientID", "PatientBirthDate", "PatientSex")
AGE = re.compile(r"^\d{3}[DWMY]$")


def derived_uid(*parts: str) -> str:
    """A UID that is the same for the same ``parts`` (pydicom hashes them under its root)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _header(source: pydicom.Dataset) -> pydicom.Dataset:
    header = copy.copy(source)
    for keyword in TYPE2_STUDY:  # Type 2: present, empty when the source has no value
        if keyword not in header:
            setattr(header, keyword, "")
    if "PatientAge" in header and not AGE.match(str(header.PatientAge or "")):
        del header.PatientAge
    return header


def build_sr(source: pydicom.Dataset, result: Result) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR for ``result`` on ``source`` (its header is enough: no pixels needed)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=derived_uid(result.model_name, result.model_version),
                                                       name=result.model_name,
                                                       manufacturer_name=MANUFACTURER,
                                                       model_name=result.model_version[:64])
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    source = _header(source)
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PLAIN_CHEST_XRAY,
                                     imaging_measurements=[_group(source, result)])
    series_uid = derived_uid(source.StudyInstanceUID, result.model_name, result.model_version, "sr-series")
    sop_uid = derived_uid(source.SOPInstanceUID, result.model_name, result.model_version, "sr")
    with warnings.catch_warnings():
        # highdicom's warnings about odd header values quote them (a PatientName, say) into the logs.
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.ComprehensiveSR(
            evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            series_description=f"cxr-ray {result.model_name}",
        )


def read_result(sr: pydicom.Dataset) -> dict:
    """What an SR written by :func:`build_sr` says, read from its content tree (tests, audits)."""
    out: dict = {}
    for item in _walk(sr.ContentSequence):
        name = getattr(item, "ConceptNameCodeSequence", [None])[0]
        if name is None:
            continue
        key = (name.CodingSchemeDesignator, name.CodeValue)
        if key == ("DCM", "121071") and item.ValueType == "CODE":
            out["predicted_label"] = item.ConceptCodeSequence[0].CodeMeaning
        elif key == (SCHEME, "flagged"):
            out["flagged"] = item.ConceptCodeSequence[0].CodeValue == codes.SCT.Yes.value
        elif key in ((SCHEME, "score"), (SCHEME, "threshold")) and item.ValueType == "NUM":
            out[name.CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
        elif key == ("DCM", "111001"):  # Algorithm Name
            out["model_name"] = item.TextValue
        elif key == ("DCM", "111003"):  # Algorithm Version
            out["model_version"] = item.TextValue
        elif item.ValueType == "IMAGE" and getattr(item, "ReferencedSOPSequence", None):
            out["source_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return out


def _walk(items):
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []) or [])
