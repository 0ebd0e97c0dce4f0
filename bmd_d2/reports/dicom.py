"""Standard DICOM outputs of a measured study: SEG of the vertebral bodies, TID 1500 SR of the BMD values, SC overlay.

All encoding is done by `highdicom <https://highdicom.readthedocs.io>`_; this module only decides what goes in.
The objects join the *source study* (same StudyInstanceUID, patient module copied from the source CT by highdicom) so
a PACS or viewer files them next to the CT; each is a new series.

* **SEG** (:func:`build_segmentation`, Segmentation Storage, BINARY): one segment per measured vertebra (cranial →
  caudal), in the frame geometry of the source CT images (one SEG frame per source slice that holds mask pixels; the
  source images are the referenced images). The sagittal masks are mapped back with
  :func:`bmd_d2.data.sagittal.sagittal_mask_to_volume` over the slab the sagittal measurement covered (the 3 channels:
  ``3 × channel spacing`` mm around the mid-sagittal plane), as ``masks.nii.gz`` is. Algorithm ``bmd_d2`` /
  package version / ``model=<model name>``, family DCM 123110 "Artificial Intelligence", type AUTOMATIC.
* **SR** (:func:`build_report`, Comprehensive 3D SR, TID 1500 Measurement Report): one TID 1411 volumetric measurement
  group per vertebra that references its SEG segment (``ReferencedSegment``) and carries the values of
  ``result.json``; one TID 1501 group with the patient-level values. Observer: the device ``bmd_d2``; the
  algorithm is identified per group (it covers the group's measurements).
* **SC** (:func:`build_overlay_sc`, Secondary Capture, RGB): the overlay PNG, for viewers that show nothing else.

Codes (every standard code is taken from ``pydicom.sr.codedict.codes``; nothing is typed in by hand):

=====================================  =================================================================================
segment category                       SCT 91723000 "Anatomical Structure"
segment type / anatomic region         SCT "T11 vertebra" 12989004, "T12 vertebra" 23215003, "L1 vertebra" 66794005,
                                       "L2 vertebra" 14293000, "L3 vertebra" 36470004, "L4 vertebra" 11994002,
                                       "L5 vertebra" 49668003, S1: "Sacrum" 54735007; unnamed level: "Vertebra"
                                       51282000. No "vertebral body" concept exists in these dictionaries, so the
                                       segment label says "vertebral body" and the type is the vertebra.
procedure reported                     SCT 77477000 "Computed tomography"
finding type / finding site            SCT 51282000 "Vertebra" (S1: 54735007 "Sacrum") / the level code above
trabecular HU                          DCM 112031 "Attenuation Coefficient", derivation SCT 373098007 "Mean"
                                       (SD: SCT 386136009 "Standard Deviation"), unit UCUM ``[hnsf'U]``; method (private
                                       code) ``sagittal-roi`` or ``3d-core`` tells the two ROIs apart
BMD values, categories, QC flags       private coding scheme ``99BMDD2`` (DICOM reserves designators starting "99"
                                       for local codes): no standard concept for volumetric trabecular BMD or for these
                                       categories exists in pydicom's/highdicom's dictionaries. BMD unit UCUM
                                       ``mg/cm3``. See :data:`BMD_CODES`, :data:`CATEGORY_NAMES`.
=====================================  =================================================================================

QC flags are qualitative evaluations with name ``99BMDD2 qc-flag`` and a value code whose value and meaning are the
flag name (e.g. ``levels_unanchored``; meanings in :data:`bmd_d2.measure.result.QC_FLAGS`): highdicom's TID 1411/1501
groups hold coded, not free-text, evaluations.

Real-world (de-identified) sources: the writers get copies of the source headers prepared by
:func:`bmd_d2.reports.dicom_sources.prepare_sources` (missing Type 2 attributes present and empty; empty or missing
Study/Series/SOP Instance/Frame of Reference UIDs generated deterministically, recorded in ``study["generated_uids"]``
and the study flag ``source_uids_generated``).
The objects' own Series/SOP Instance UIDs are deterministic (:func:`output_uids`). The model is named after its
weights file (:func:`model_name`). :func:`write_dicom_outputs` builds each object on its own and reports a failure as
one line naming the output, the source file and the attribute (docs/dicom_outputs.md, "Real-world sources").

When nothing was measured (e.g. a model that detects nothing) no SEG is written (a SEG needs at least one segment)
and a warning says so; the SR is still written (patient group with the study QC flags, e.g.
``no_vertebrae_detected``). DICOM outputs need a DICOM source: a NIfTI input gives
:class:`~bmd_d2.reports.dicom_sources.DicomOutputsUnavailable`.

Unlike ``result.json``, these objects carry the source's patient module (name, ID, ...): that is what links them to the
study in a PACS. Treat them as patient data.
"""
import copy
import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from bmd_d2.errors import BMDError, one_line
from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.files import atomic_path

from .dicom_sources import (POSITION_TOL_MM, UIDS_FLAG, DicomOutputsUnavailable, SourceHeaderError, header_text,
                            is_dicom_result, prepare_sources, prepared_sources, read_source_datasets, source_path)
from .nifti import slab_thickness_mm
from .overlay import VERTEBRA_COLORS, write_overlay

logger = logging.getLogger(__name__)

SEG_FILE = "segmentation.dcm"
SR_FILE = "report_sr.dcm"
SC_FILE = "overlay_sc.dcm"
KINDS = ("seg", "sr", "sc")
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "sc": 9903}
PRIVATE_SCHEME = "99BMDD2"
MANUFACTURER = "bmd_d2"


# ---------------------------------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------------------------------
def _codes():
    from pydicom.sr.codedict import codes

    return codes


def _private(value: str, meaning: str):
    """A code of the local coding scheme :data:`PRIVATE_SCHEME`."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def level_code(level: Optional[str]):
    """SCT code of a level (``"T11"`` … ``"L5"``, ``"S1"`` → Sacrum); None/unknown → SCT "Vertebra"."""
    sct = _codes().SCT
    if level == "S1":
        return sct.Sacrum
    if level and level[0] in "TL":
        return getattr(sct, f"{level}Vertebra")
    return sct.Vertebra


# name, private code value, code meaning (≤ 64 characters), VertebraResult attribute
BMD_CODES = (
    ("bmd", "bmd", "Trabecular BMD, reported", "bmd"),
    ("learned_bmd", "bmd-learned", "Trabecular BMD, learned estimate", "learned_bmd"),
    ("classical_bmd", "bmd-classical", "Trabecular BMD, classical, sagittal ROI", "classical_bmd"),
    ("classical_bmd_3d", "bmd-classical-3d", "Trabecular BMD, classical, 3-D core", "classical_bmd_3d"),
    ("bmd_difference", "bmd-difference", "Learned minus classical trabecular BMD", "bmd_difference"),
)
CATEGORY_NAMES = {
    "acr": ("acr-qct-category", "ACR QCT category"),
    "acr_classical": ("acr-qct-category-classical", "ACR QCT category, classical BMD"),
    "hu": ("l1-hu-category", "L1 HU opportunistic screening category"),
}
CATEGORY_MEANINGS = {
    "normal": "Normal bone density", "osteopenia": "Osteopenia (low bone mass)", "osteoporosis": "Osteoporosis",
    "normal_likely": "Normal bone density likely", "indeterminate": "Indeterminate",
    "osteoporosis_likely": "Osteoporosis likely",
}
METHODS = {"sagittal": ("sagittal-roi", "Eroded sagittal ROI, 3 slices"), "3d": ("3d-core", "3-D trabecular core")}


def _mg_cm3():
    from highdicom.sr import CodedConcept

    return CodedConcept(value="mg/cm3", scheme_designator="UCUM", meaning="mg/cm3")


def _category_item(kind: str, value: Optional[str]):
    import highdicom as hd

    if not value:
        return None
    return hd.sr.QualitativeEvaluation(_private(*CATEGORY_NAMES[kind]),
                                       _private(value, CATEGORY_MEANINGS.get(value, value)))


def _flag_items(flags: Sequence[str]):
    import highdicom as hd

    return [hd.sr.QualitativeEvaluation(_private("qc-flag", "QC flag"), _private(f, f)) for f in flags]




# ---------------------------------------------------------------------------------------------------------------------
# Source geometry of the SEG
# ---------------------------------------------------------------------------------------------------------------------
# geometry the SEG needs from every source image (the loader needs them too: only a file changed since is caught here)
SOURCE_GEOMETRY = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def _check_geometry(datasets):
    """Raise :class:`SourceHeaderError` naming the first source file whose geometry attribute is missing or bad."""
    if _is_multiframe(datasets):
        return  # checked frame by frame in _frame_geometry
    sizes = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "Rows": 1, "Columns": 1}
    for ds in datasets:
        for kw in SOURCE_GEOMETRY:
            if kw not in ds:
                raise SourceHeaderError(f"{source_path(ds)}: {kw} is missing")
            value = ds[kw].value
            if value is None or value == "" or (hasattr(value, "__len__") and not isinstance(value, str)
                                                 and len(value) == 0):
                raise SourceHeaderError(f"{source_path(ds)}: {kw} is empty")
            values = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
            try:
                ok = len(values) == sizes[kw] and all(np.isfinite(float(x)) for x in values)
            except (TypeError, ValueError):
                ok = False
            if not ok or (kw in ("Rows", "Columns", "PixelSpacing") and min(float(x) for x in values) <= 0):
                raise SourceHeaderError(f"{source_path(ds)}: {kw} is malformed ({value})")


def _is_multiframe(datasets) -> bool:
    return len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1


def _frame_geometry(datasets) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int]]:
    """Per-frame ImagePositionPatient ``(N, 3)``, orientation ``(6,)``, PixelSpacing ``(2,)``, ``(rows, cols)``."""
    if _is_multiframe(datasets):
        ds = datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0]
        per = ds.PerFrameFunctionalGroupsSequence

        def fg(i, seq, kw):
            for item in (per[i], shared):
                if seq in item:
                    return getattr(item[seq].value[0], kw)
            raise SourceHeaderError(f"{source_path(ds)}: frame {i + 1} lacks {seq}")

        pos = np.array([[float(x) for x in fg(i, "PlanePositionSequence", "ImagePositionPatient")]
                        for i in range(len(per))])
        iop = np.array([float(x) for x in fg(0, "PlaneOrientationSequence", "ImageOrientationPatient")])
        ps = np.array([float(x) for x in fg(0, "PixelMeasuresSequence", "PixelSpacing")])
    else:
        ds = datasets[0]
        pos = np.array([[float(x) for x in d.ImagePositionPatient] for d in datasets])
        iop = np.array([float(x) for x in ds.ImageOrientationPatient])
        ps = np.array([float(x) for x in ds.PixelSpacing])
    return pos, iop, ps, (int(ds.Rows), int(ds.Columns))


def source_frame_masks(result: StudyResult, datasets) -> np.ndarray:
    """Each vertebra's sagittal mask mapped into the source frames.

    Uses one :func:`sagittal_mask_to_volume` call per vertebra on the stacked source grid when the source slices are
    evenly spaced with one orientation (the usual case), else one call per frame (uneven/duplicate positions are
    exact too: every frame gets its own affine).

    Returns:
        bool ``(N, rows, cols, V)``: N source frames (order of ``datasets``/their frames), V = ``len(vertebrae)``.
    """
    from bmd_d2.data.sagittal import sagittal_mask_to_volume

    sag = result.sagittal
    pos, iop, ps, (rows, cols) = _frame_geometry(datasets)
    n = len(pos)
    base = np.eye(4)
    base[:3, 0] = iop[:3] * ps[1]  # column index i runs along the row direction, column spacing
    base[:3, 1] = iop[3:] * ps[0]
    normal = np.cross(iop[:3], iop[3:])
    steps = np.diff(pos, axis=0)
    regular = n > 1 and np.allclose(steps, steps[0], atol=POSITION_TOL_MM) \
        and np.linalg.norm(steps[0]) > POSITION_TOL_MM
    thickness = slab_thickness_mm(sag)
    out = np.zeros((n, rows, cols, len(result.vertebrae)), bool)
    for s, v in enumerate(result.vertebrae):
        if v.mask is None or not np.any(v.mask):
            continue
        if regular:
            aff = base.copy()
            aff[:3, 2], aff[:3, 3] = steps[0], pos[0]
            out[..., s] = sagittal_mask_to_volume(sag, v.mask, (n, rows, cols), aff, thickness_mm=thickness)
        else:
            for k in range(n):
                aff = base.copy()
                aff[:3, 2], aff[:3, 3] = normal, pos[k]
                out[k, ..., s] = sagittal_mask_to_volume(sag, v.mask, (1, rows, cols), aff, thickness_mm=thickness)[0]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------------
OUTPUT_NAMES = {"seg": "dicom_seg", "sr": "dicom_sr", "sc": "dicom_sc"}
OUTPUT_LABELS = {"seg": "DICOM SEG", "sr": "DICOM SR", "sc": "DICOM SC"}
# study flags the writers themselves add: left out of the measurement digest of the output UIDs
_WRITER_FLAGS = (UIDS_FLAG, "output_not_written")


def _version() -> str:
    from bmd_d2.version import __version__

    return str(__version__)


def model_name(result: StudyResult) -> str:
    """Name of the model that measured ``result`` (≤ 64 characters): the weights file name without its extension
    (``result.model["weights"]``, set by :class:`~bmd_d2.measure.predictor.BMDStudyPredictor`; ``(random init)``
    without weights), else a ``config`` file name, else ``bmd_d2`` (e.g. detections measured directly)."""
    model = result.model or {}
    for key in ("weights", "config"):
        value = str(model.get(key) or "").strip()
        if value:
            name = os.path.basename(value)
            stem = os.path.splitext(name)[0] if name.lower().endswith((".pth", ".pkl", ".pt", ".yaml", ".yml")) \
                else name
            return (stem or name)[:64]
    return "bmd_d2"


def _measurement_digest(result: StudyResult) -> str:
    """SHA-256 of what was measured (values of ``result.json`` except the source identifiers and output bookkeeping,
    plus the masks): the same measurement gives the same digest."""
    d = result.to_dict()
    keep = {k: d.get(k) for k in ("vertebrae", "patient", "calibration", "model", "rejected", "qc")}
    keep["qc_flags"] = [f for f in d.get("qc_flags") or [] if f not in _WRITER_FLAGS]
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    for v in result.vertebrae:
        if v.mask is not None:
            m = np.asarray(v.mask, bool)
            h.update(str(m.shape).encode() + np.packbits(m).tobytes())
    return h.hexdigest()


def output_uids(result: StudyResult, sources: Sequence, kind: str, *extra) -> Tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the ``kind`` object, deterministic: ``generate_uid(entropy_srcs=...)``
    of the source SeriesInstanceUID (as prepared), the kind, the package version, :func:`_measurement_digest` and
    ``extra`` (the SR: the SEG it references). A re-sent report of the same measurement replaces the earlier one."""
    from pydicom.uid import generate_uid

    base = [header_text(sources[0], "SeriesInstanceUID"), kind, _version(), _measurement_digest(result),
            *[str(x) for x in extra]]
    return str(generate_uid(entropy_srcs=base + ["series"])), str(generate_uid(entropy_srcs=base + ["instance"]))


def _derived_uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def segment_label(v) -> str:
    """Segment label / tracking identifier of a vertebra (≤ 64 characters)."""
    if v.level == "S1":
        return "S1 (sacrum)"
    return f"{v.level} vertebral body" if v.level else "unnamed vertebral body"


def build_segmentation(result: StudyResult, source_datasets: Optional[Sequence] = None):
    """The DICOM SEG of the measured vertebrae, or None when no vertebra maps to any source voxel.

    Args:
        result: a measured DICOM study (with ``volume`` and ``sagittal``).
        source_datasets: the source CT datasets (default :func:`read_source_datasets`); prepared by
            :func:`prepare_sources` unless they already are.

    Returns:
        ``(segmentation, segment_numbers)``: the ``highdicom.seg.Segmentation`` (or None) and, per vertebra of
        ``result.vertebrae``, its segment number (None for a vertebra without voxels in the source geometry).

    Raises:
        SourceHeaderError: a source image lacks a geometry attribute (:data:`SOURCE_GEOMETRY`) or has a bad one.
    """
    import highdicom as hd

    codes = _codes()
    datasets = prepared_sources(result, source_datasets)
    _check_geometry(datasets)
    masks = source_frame_masks(result, datasets)
    series_uid, sop_uid = output_uids(result, datasets, "seg")
    model = model_name(result)
    algo = hd.AlgorithmIdentificationSequence(
        name="bmd_d2", family=codes.cid7162.ArtificialIntelligence, version=_version(), parameters={"model": model})
    keep, numbers, descriptions = [], [], []
    for s, v in enumerate(result.vertebrae):
        if not masks[..., s].any():
            logger.warning("%s: %s has no voxel in the source geometry; left out of the SEG", result.study_id,
                           segment_label(v))
            numbers.append(None)
            continue
        keep.append(s)
        numbers.append(len(keep))
        label = segment_label(v)
        rgb = (np.array(VERTEBRA_COLORS[s % len(VERTEBRA_COLORS)]) * 255).round().astype(int)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(keep), segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=level_code(v.level), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_uid=_derived_uid(sop_uid, "segment", len(keep)),
            tracking_id=label, anatomic_regions=[level_code(v.level)],
            display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    if not keep:
        return None, numbers
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks[..., keep].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=series_uid, series_number=SERIES_NUMBERS["seg"], sop_instance_uid=sop_uid,
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model,
        software_versions=_version(), device_serial_number="1", content_label="VERTEBRAE",
        content_description="bmd_d2 vertebral bodies (sagittal slab)", series_description="bmd_d2 vertebrae SEG",
        omit_empty_frames=True)
    _fix_dimension_organization_uid(seg, _derived_uid(sop_uid, "dimension-organization"))
    return seg, numbers


def _fix_dimension_organization_uid(ds, uid: str):
    """Replace the random DimensionOrganizationUID highdicom draws (no constructor argument sets it) with ``uid``
    everywhere it occurs, so that the same measurement gives the same object."""
    old = {item.DimensionOrganizationUID for item in ds.get("DimensionOrganizationSequence", [])
           if "DimensionOrganizationUID" in item}
    for item in ds.get("DimensionOrganizationSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence", []):
        if item.get("DimensionOrganizationUID") in old:
            item.DimensionOrganizationUID = uid


def _num(name, value, unit, **kw):
    """A TID 300 measurement. No per-measurement algorithm: the group's algorithm identification (TID 4019) covers
    every measurement of the group (repeating it per value doubled the SR's size and build time)."""
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kw)


def _vertebra_group(v, seg, segment_number, algo, source_series_uid, tracking_uid):
    """TID 1411 (or TID 1501 without a segment) group of one vertebra."""
    import highdicom as hd

    codes = _codes()
    site = level_code(v.level)
    measurements = []
    for _, value, meaning, attr in BMD_CODES:
        x = getattr(v, attr)
        if x is not None and np.isfinite(x):
            measurements.append(_num(_private(value, meaning), x, _mg_cm3()))
    hu_items = (("trabecular_hu", codes.SCT.Mean, "sagittal"),
                ("trabecular_hu_sd", codes.SCT.StandardDeviation, "sagittal"),
                ("trabecular_hu_3d", codes.SCT.Mean, "3d"))
    for attr, derivation, method in hu_items:
        x = getattr(v, attr)
        if x is not None and np.isfinite(x):
            measurements.append(_num(codes.DCM.AttenuationCoefficient, x, codes.UCUM.HounsfieldUnit,
                                     derivation=derivation, method=_private(*METHODS[method])))
    evaluations = [e for e in [_category_item("acr", v.category)] if e] + _flag_items(v.qc_flags)
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=segment_label(v)),
        finding_type=codes.SCT.Sacrum if v.level == "S1" else codes.SCT.Vertebra, algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(site)], measurements=measurements or None,
        qualitative_evaluations=evaluations or None)
    if seg is None or segment_number is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    ref = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                  segment_number=segment_number,
                                  source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common)


def _patient_group(result: StudyResult, algo, tracking_uid):
    """TID 1501 group of the patient-level values (ACR BMD/category, L1 HU/category) and the study QC flags."""
    import highdicom as hd

    codes = _codes()
    p = result.patient or {}
    ms = []
    for key, value, meaning in (("acr_bmd", "acr-bmd", "ACR QCT patient BMD, mean of two lumbar vertebrae"),
                                ("acr_bmd_classical", "acr-bmd-classical", "ACR QCT patient BMD, classical")):
        if p.get(key) is not None:
            ms.append(_num(_private(value, meaning), p[key], _mg_cm3()))
    if p.get("l1_hu") is not None:
        ms.append(_num(codes.DCM.AttenuationCoefficient, p["l1_hu"], codes.UCUM.HounsfieldUnit,
                       derivation=codes.SCT.Mean, method=_private(*METHODS["sagittal"]),
                       finding_sites=[hd.sr.FindingSite(codes.SCT.L1Vertebra)]))
    evals = [e for e in (_category_item("acr", p.get("acr_category")),
                         _category_item("acr_classical", p.get("acr_category_classical")),
                         _category_item("hu", p.get("hu_category"))) if e] + _flag_items(result.qc_flags)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="patient"),
        finding_type=codes.SCT.LumbarSpine, algorithm_id=algo, finding_sites=[hd.sr.FindingSite(codes.SCT.LumbarSpine)],
        measurements=ms or None, qualitative_evaluations=evals or None)


def build_report(result: StudyResult, seg=None, segment_numbers: Optional[Sequence[Optional[int]]] = None,
                 source_datasets: Optional[Sequence] = None):
    """The TID 1500 Measurement Report (Comprehensive 3D SR) of ``result``.

    Args:
        result: a measured DICOM study.
        seg: the SEG from :func:`build_segmentation` (None: the groups reference no segment, TID 1501).
        segment_numbers: per vertebra, its segment number in ``seg`` (from :func:`build_segmentation`).
        source_datasets: the source CT datasets (default :func:`read_source_datasets`); prepared by
            :func:`prepare_sources` unless they already are.

    Returns:
        ``highdicom.sr.Comprehensive3DSR``: groups per vertebra (cranial → caudal) then the patient group (with the
        study QC flags, :data:`UIDS_FLAG` among them when UIDs were generated); evidence = the source images and the
        SEG. The local coding scheme :data:`PRIVATE_SCHEME` is declared in CodingSchemeIdentificationSequence.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    codes = _codes()
    datasets = prepared_sources(result, source_datasets)
    numbers = list(segment_numbers) if segment_numbers is not None else [None] * len(result.vertebrae)
    series_uid, sop_uid = output_uids(result, datasets, "sr", seg.SOPInstanceUID if seg is not None else "no SEG")
    model = model_name(result)
    algo = hd.sr.AlgorithmIdentification(name="bmd_d2", version=_version(), parameters=[f"model={model}"[:64]],
                                         manufacturer=MANUFACTURER, family=codes.cid7162.ArtificialIntelligence)
    source_series = header_text(datasets[0], "SeriesInstanceUID")
    groups = [_vertebra_group(v, seg, n, algo, source_series, _derived_uid(sop_uid, "tracking", i))
              for i, (v, n) in enumerate(zip(result.vertebrae, numbers))]
    groups.append(_patient_group(result, algo, _derived_uid(sop_uid, "tracking", "patient")))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_derived_uid("bmd_d2", _version(), model), name="bmd_d2", manufacturer_name=MANUFACTURER,
            model_name=model))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomography, imaging_measurements=groups)
    evidence = datasets + ([seg] if seg is not None else [])
    scheme = CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="bmd_d2 local codes",
                                                  responsible_organization=MANUFACTURER)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="bmd_d2 BMD report", coding_schemes=[scheme])


def _orientation_letter(vec) -> str:
    v = np.asarray(vec, float)
    a = int(np.argmax(np.abs(v)))
    return ("L", "P", "H")[a] if v[a] > 0 else ("R", "A", "F")[a]


def build_overlay_sc(result: StudyResult, png_path: str, source_dataset=None):
    """Secondary Capture (RGB) of the overlay PNG, in the source study.

    PatientOrientation comes from the sagittal transform (direction of increasing column / row index); the PNG is a
    figure (image plus labels), so no pixel spacing is given. Patient and study come from ``source_dataset`` (default:
    the first prepared source image; pass one of :func:`prepare_sources`' copies so that generated UIDs agree with
    the SEG/SR), with PatientIdentityRemoved / De-identification Method copied; ImageLaterality ``U`` (unpaired).
    """
    import highdicom as hd
    from PIL import Image

    if source_dataset is None:
        src = prepared_sources(result, None)[0]
    else:
        src = source_dataset if getattr(source_dataset, "_bmd_d2_prepared", False) else \
            prepare_sources(result, [source_dataset])[0]
    with Image.open(png_path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    t = np.asarray(result.sagittal.transform)
    series_uid, sop_uid = output_uids(result, [src], "sc")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=(_orientation_letter(t[:3, 0]), _orientation_letter(t[:3, 1])),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = "bmd_d2 overlay"
    sc.ImageLaterality = "U"  # unpaired structure (the spine): no series Laterality (Type 2C) is required
    for kw in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if kw in src:
            sc[kw] = copy.deepcopy(src[kw])
    return sc


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def _save(ds, path: str):
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


_NO_ATTRIBUTE = re.compile(r"'\w*Dataset' object has no attribute '(\w+)'")


def failure_message(kind: str, exc: BaseException, sources: Sequence = ()) -> str:
    """One line: ``"DICOM SEG not written: <source file>: <problem>"``; the attribute named where it can be told (a
    :class:`SourceHeaderError`'s own message; a missing attribute that highdicom or pydicom tripped over)."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword
    from pydicom.tag import Tag

    label = f"{OUTPUT_LABELS.get(kind, kind)} not written"
    text = one_line(exc)
    if isinstance(exc, BMDError):
        return f"{label}: {text}"
    sources = list(sources or [])
    where = source_path(sources[0]) if sources else "source images"
    keyword = None
    if isinstance(exc, AttributeError):
        m = _NO_ATTRIBUTE.search(text)
        keyword = m.group(1) if m and tag_for_keyword(m.group(1)) is not None else None
    elif isinstance(exc, KeyError) and exc.args:
        try:
            keyword = keyword_for_tag(Tag(exc.args[0])) or None
        except Exception:  # not a tag: the KeyError is about something else
            keyword = None
    if keyword:
        lacking = next((ds for ds in sources if keyword not in ds), None)
        if lacking is not None:
            return f"{label}: {source_path(lacking)}: {keyword} is missing"
        return f"{label}: {where}: {keyword} is missing or unusable ({type(exc).__name__}: {text})"
    return f"{label}: {where}: {type(exc).__name__}: {text}"


def write_dicom_outputs(result: StudyResult, out_dir: str, kinds: Sequence[str] = KINDS,
                        overlay_png: Optional[str] = None, *,
                        errors: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Write the requested DICOM objects into ``out_dir`` (each atomically).

    Args:
        result: a measured DICOM study. Source headers are prepared with :func:`prepare_sources` (which may add
            ``study["generated_uids"]`` and the :data:`UIDS_FLAG` flag to ``result``).
        out_dir: the study's output folder.
        kinds: any of ``"seg"``, ``"sr"``, ``"sc"``. The SR references the SEG only when the SEG is written too.
        overlay_png: the overlay PNG for the SC (default: rendered to a temporary file).
        errors: None: the first output that fails raises. A dict: every requested output is attempted on its own; a
            failure is recorded as ``errors["dicom_seg" | "dicom_sr" | "dicom_sc"]`` = one line naming the output, the
            source file and the missing/bad attribute where known (:func:`failure_message`), nothing is logged, and
            the other outputs are still written (the SR without segment references when the SEG failed).

    Returns:
        name (``dicom_seg``, ``dicom_sr``, ``dicom_sc``) → path of the files written. An empty SEG (nothing
        measured) is skipped with a warning.

    Raises:
        DicomOutputsUnavailable: not a DICOM input (NIfTI); with ``errors=None`` also when the source images cannot
            be re-read (with a dict, that is a failure of each output).
        BMDError: with ``errors=None``, the first output that cannot be built or saved (the message as above).
    """
    kinds = [k for k in KINDS if k in set(kinds)]
    paths: Dict[str, str] = {}
    if not kinds:
        return paths
    if not is_dicom_result(result):
        read_source_datasets(result)  # raises DicomOutputsUnavailable with the reason
    os.makedirs(out_dir, exist_ok=True)

    def failed(kind: str, exc: BaseException, sources: Sequence = ()):
        msg = failure_message(kind, exc, sources)
        if errors is None:
            raise BMDError(msg) from exc
        errors[OUTPUT_NAMES[kind]] = msg

    try:
        sources = prepare_sources(result, read_source_datasets(result), copy_datasets=False)  # read here: ours
    except DicomOutputsUnavailable as e:
        if errors is None:
            raise
        for k in kinds:
            errors[OUTPUT_NAMES[k]] = f"{OUTPUT_LABELS[k]} not written: {one_line(e)}"
        return paths
    except Exception as e:  # preparing the copies failed (e.g. a file vanished while hashing it)
        for k in kinds:
            failed(k, e)
        return paths
    seg, numbers = None, None
    if "seg" in kinds:
        try:
            seg, numbers = build_segmentation(result, sources)
            if seg is None:
                logger.warning("%s: no measured vertebra: DICOM SEG not written", result.study_id)
            else:
                _save(seg, os.path.join(out_dir, SEG_FILE))
                paths["dicom_seg"] = os.path.join(out_dir, SEG_FILE)
        except Exception as e:  # highdicom/pydicom raise many types for odd headers; each becomes one line
            seg, numbers = None, None
            failed("seg", e, sources)
    if "sr" in kinds:
        try:
            _save(build_report(result, seg, numbers, sources), os.path.join(out_dir, SR_FILE))
            paths["dicom_sr"] = os.path.join(out_dir, SR_FILE)
        except Exception as e:
            failed("sr", e, sources)
    if "sc" in kinds:
        tmp = None
        try:
            png = overlay_png if overlay_png and os.path.isfile(overlay_png) else None
            if png is None:
                fd, tmp = tempfile.mkstemp(prefix=".overlay.", suffix=".png", dir=out_dir)
                os.close(fd)
                write_overlay(result, tmp)
                png = tmp
            _save(build_overlay_sc(result, png, sources[0]), os.path.join(out_dir, SC_FILE))
            paths["dicom_sc"] = os.path.join(out_dir, SC_FILE)
        except Exception as e:
            failed("sc", e, sources)
        finally:
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
    return paths


def write_if_possible(result: StudyResult, out_dir: str, kinds: Sequence[str],
                      overlay_png: Optional[str] = None) -> Dict[str, str]:
    """:func:`write_dicom_outputs` for the report writer: a non-DICOM input is a warning (nothing written).

    Raises:
        BMDError: an object could not be built from a DICOM input (one line naming the output, the source file and
            the attribute where known).
    """
    try:
        return write_dicom_outputs(result, out_dir, kinds, overlay_png=overlay_png)
    except DicomOutputsUnavailable as e:
        logger.warning("%s: DICOM outputs skipped: %s", result.study_id, e)
        return {}
