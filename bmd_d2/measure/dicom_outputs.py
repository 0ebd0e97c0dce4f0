"""Standard DICOM outputs of a measured study: SEG of the vertebral bodies, TID 1500 SR of the BMD values, SC overlay.

All encoding is done by `highdicom <https://highdicom.readthedocs.io>`_; this module only decides what goes in.
The objects join the *source study* (same StudyInstanceUID, patient module copied from the source CT by highdicom) so
a PACS or viewer files them next to the CT; each is a new series.

* **SEG** (:func:`build_segmentation`, Segmentation Storage, BINARY): one segment per measured vertebra (cranial →
  caudal), in the frame geometry of the source CT images (one SEG frame per source slice that holds mask pixels; the
  source images are the referenced images). The sagittal masks are mapped back with
  :func:`bmd_d2.data.sagittal.sagittal_mask_to_volume` over the slab the sagittal measurement covered (the 3 channels:
  ``3 × channel spacing`` mm around the mid-sagittal plane), as ``masks.nii.gz`` is. Algorithm ``bmd_d2`` /
  package version, family DCM 123110 "Artificial Intelligence", type AUTOMATIC.
* **SR** (:func:`build_report`, Comprehensive 3D SR, TID 1500 Measurement Report): one TID 1411 volumetric measurement
  group per vertebra that references its SEG segment (``ReferencedSegment``) and carries the values of
  ``result.json``; one TID 1501 group with the patient-level values. Observer: the device ``bmd_d2``.
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

When nothing was measured (e.g. a model that detects nothing) no SEG is written (a SEG needs at least one segment)
and a warning says so; the SR is still written (patient group with the study QC flags, e.g.
``no_vertebrae_detected``). DICOM outputs need a DICOM source: a NIfTI input gives :class:`DicomOutputsUnavailable`.

Unlike ``result.json``, these objects carry the source's patient module (name, ID, ...): that is what links them to the
study in a PACS. Treat them as patient data.
"""
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .result import StudyResult

logger = logging.getLogger(__name__)

SEG_FILE = "segmentation.dcm"
SR_FILE = "report_sr.dcm"
SC_FILE = "overlay_sc.dcm"
KINDS = ("seg", "sr", "sc")
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "sc": 9903}
PRIVATE_SCHEME = "99BMDD2"
MANUFACTURER = "bmd_d2"
_POS_TOL_MM = 0.01


class DicomOutputsUnavailable(ValueError):
    """The result cannot give DICOM outputs (e.g. the input was NIfTI, or the source files are gone)."""


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
# Source images and geometry
# ---------------------------------------------------------------------------------------------------------------------
def is_dicom_result(result: StudyResult) -> bool:
    """Whether ``result`` was measured on a DICOM series whose files are listed in ``result.volume.meta``."""
    meta = getattr(result.volume, "meta", None) or {}
    return bool(meta.get("files")) and bool(meta.get("SOPInstanceUIDs")) and meta.get("format") != "nifti"


def read_source_datasets(result: StudyResult) -> List:
    """The source CT datasets (headers, no pixel data) in slice order, one per file of ``volume.meta["files"]``.

    Raises:
        DicomOutputsUnavailable: not a DICOM input, or a file cannot be read / is not the series measured.
    """
    import pydicom

    if not is_dicom_result(result):
        src = (getattr(result.volume, "meta", None) or {}).get("source") or result.study.get("source") or "input"
        raise DicomOutputsUnavailable(f"DICOM outputs need a DICOM series as input; {src} is not one")
    meta = result.volume.meta
    files = list(dict.fromkeys(meta["files"]))  # a multi-frame file is listed once per frame
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types
            raise DicomOutputsUnavailable(f"cannot re-read source image {f}: {type(e).__name__}: {e}") from None
        if ds.get("SeriesInstanceUID") != meta.get("SeriesInstanceUID"):
            raise DicomOutputsUnavailable(f"source image {f} is not in the measured series")
        out.append(ds)
    return out


def _frame_geometry(datasets) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int]]:
    """Per-frame ImagePositionPatient ``(N, 3)``, orientation ``(6,)``, PixelSpacing ``(2,)``, ``(rows, cols)``."""
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0]
        per = ds.PerFrameFunctionalGroupsSequence

        def fg(i, seq, kw):
            for item in (per[i], shared):
                if seq in item:
                    return getattr(item[seq].value[0], kw)
            raise DicomOutputsUnavailable(f"multi-frame source lacks {seq}")

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


def _slab_thickness(sag) -> float:
    """Thickness (mm) of the slab the sagittal measurement covered: channels × channel spacing (as masks.nii.gz)."""
    return np.asarray(sag.hu).shape[0] * float(np.linalg.norm(np.asarray(sag.transform)[:3, 2]))


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
    regular = n > 1 and np.allclose(steps, steps[0], atol=_POS_TOL_MM) and np.linalg.norm(steps[0]) > _POS_TOL_MM
    thickness = _slab_thickness(sag)
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
def _version() -> str:
    from bmd_d2 import __version__

    return str(__version__)


def _model_name(result: StudyResult) -> str:
    cfg = (result.model or {}).get("config") or ""
    return (os.path.splitext(os.path.basename(str(cfg)))[0] or "bmd_d2")[:64]


def segment_label(v) -> str:
    """Segment label / tracking identifier of a vertebra (≤ 64 characters)."""
    if v.level == "S1":
        return "S1 (sacrum)"
    return f"{v.level} vertebral body" if v.level else "unnamed vertebral body"


def build_segmentation(result: StudyResult, source_datasets: Optional[Sequence] = None):
    """The DICOM SEG of the measured vertebrae, or None when no vertebra maps to any source voxel.

    Args:
        result: a measured DICOM study (with ``volume`` and ``sagittal``).
        source_datasets: the source CT datasets (default :func:`read_source_datasets`).

    Returns:
        ``(segmentation, segment_numbers)``: the ``highdicom.seg.Segmentation`` (or None) and, per vertebra of
        ``result.vertebrae``, its segment number (None for a vertebra without voxels in the source geometry).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from .report import _COLORS

    codes = _codes()
    datasets = list(source_datasets) if source_datasets is not None else read_source_datasets(result)
    masks = source_frame_masks(result, datasets)
    algo = hd.AlgorithmIdentificationSequence(
        name="bmd_d2", family=codes.cid7162.ArtificialIntelligence, version=_version(),
        parameters={"model": _model_name(result)})
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
        rgb = (np.array(_COLORS[s % len(_COLORS)]) * 255).round().astype(int)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(keep), segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=level_code(v.level), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_uid=generate_uid(), tracking_id=label,
            anatomic_regions=[level_code(v.level)], display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    if not keep:
        return None, numbers
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks[..., keep].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["seg"], sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=_model_name(result),
        software_versions=_version(), device_serial_number="1", content_label="VERTEBRAE",
        content_description="bmd_d2 vertebral bodies (sagittal slab)", series_description="bmd_d2 vertebrae SEG",
        omit_empty_frames=True)
    return seg, numbers


def _num(name, value, unit, algo, **kw):
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algo, **kw)


def _vertebra_group(v, seg, segment_number, algo, source_series_uid):
    """TID 1411 (or TID 1501 without a segment) group of one vertebra."""
    import highdicom as hd

    codes = _codes()
    site = level_code(v.level)
    measurements = []
    for _, value, meaning, attr in BMD_CODES:
        x = getattr(v, attr)
        if x is not None and np.isfinite(x):
            measurements.append(_num(_private(value, meaning), x, _mg_cm3(), algo))
    hu_items = (("trabecular_hu", codes.SCT.Mean, "sagittal"),
                ("trabecular_hu_sd", codes.SCT.StandardDeviation, "sagittal"),
                ("trabecular_hu_3d", codes.SCT.Mean, "3d"))
    for attr, derivation, method in hu_items:
        x = getattr(v, attr)
        if x is not None and np.isfinite(x):
            measurements.append(_num(codes.DCM.AttenuationCoefficient, x, codes.UCUM.HounsfieldUnit, algo,
                                     derivation=derivation, method=_private(*METHODS[method])))
    evaluations = [e for e in [_category_item("acr", v.category)] if e] + _flag_items(v.qc_flags)
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=segment_label(v)),
        finding_type=codes.SCT.Sacrum if v.level == "S1" else codes.SCT.Vertebra, algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(site)], measurements=measurements or None,
        qualitative_evaluations=evaluations or None)
    if seg is None or segment_number is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    ref = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                  segment_number=segment_number,
                                  source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common)


def _patient_group(result: StudyResult, algo):
    """TID 1501 group of the patient-level values (ACR BMD/category, L1 HU/category) and the study QC flags."""
    import highdicom as hd

    codes = _codes()
    p = result.patient or {}
    ms = []
    for key, value, meaning in (("acr_bmd", "acr-bmd", "ACR QCT patient BMD, mean of two lumbar vertebrae"),
                                ("acr_bmd_classical", "acr-bmd-classical", "ACR QCT patient BMD, classical")):
        if p.get(key) is not None:
            ms.append(_num(_private(value, meaning), p[key], _mg_cm3(), algo))
    if p.get("l1_hu") is not None:
        ms.append(_num(codes.DCM.AttenuationCoefficient, p["l1_hu"], codes.UCUM.HounsfieldUnit, algo,
                       derivation=codes.SCT.Mean, method=_private(*METHODS["sagittal"]),
                       finding_sites=[hd.sr.FindingSite(codes.SCT.L1Vertebra)]))
    evals = [e for e in (_category_item("acr", p.get("acr_category")),
                         _category_item("acr_classical", p.get("acr_category_classical")),
                         _category_item("hu", p.get("hu_category"))) if e] + _flag_items(result.qc_flags)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="patient"),
        finding_type=codes.SCT.LumbarSpine, algorithm_id=algo, finding_sites=[hd.sr.FindingSite(codes.SCT.LumbarSpine)],
        measurements=ms or None, qualitative_evaluations=evals or None)


def build_report(result: StudyResult, seg=None, segment_numbers: Optional[Sequence[Optional[int]]] = None,
                 source_datasets: Optional[Sequence] = None):
    """The TID 1500 Measurement Report (Comprehensive 3D SR) of ``result``.

    Args:
        result: a measured DICOM study.
        seg: the SEG from :func:`build_segmentation` (None: the groups reference no segment, TID 1501).
        segment_numbers: per vertebra, its segment number in ``seg`` (from :func:`build_segmentation`).
        source_datasets: the source CT datasets (default :func:`read_source_datasets`).

    Returns:
        ``highdicom.sr.Comprehensive3DSR``: groups per vertebra (cranial → caudal) then the patient group; evidence =
        the source images and the SEG.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    codes = _codes()
    datasets = list(source_datasets) if source_datasets is not None else read_source_datasets(result)
    numbers = list(segment_numbers) if segment_numbers is not None else [None] * len(result.vertebrae)
    algo = hd.sr.AlgorithmIdentification(name="bmd_d2", version=_version(), manufacturer=MANUFACTURER,
                                         family=codes.cid7162.ArtificialIntelligence)
    series_uid = result.volume.meta["SeriesInstanceUID"]
    groups = [_vertebra_group(v, seg, n, algo, series_uid) for v, n in zip(result.vertebrae, numbers)]
    groups.append(_patient_group(result, algo))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["bmd_d2", _version(), _model_name(result)]), name="bmd_d2",
            manufacturer_name=MANUFACTURER, model_name=_model_name(result)))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomography, imaging_measurements=groups)
    evidence = datasets + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="bmd_d2 BMD report")


def _orientation_letter(vec) -> str:
    v = np.asarray(vec, float)
    a = int(np.argmax(np.abs(v)))
    return ("L", "P", "H")[a] if v[a] > 0 else ("R", "A", "F")[a]


def build_overlay_sc(result: StudyResult, png_path: str, source_dataset):
    """Secondary Capture (RGB) of the overlay PNG, in the source study.

    PatientOrientation comes from the sagittal transform (direction of increasing column / row index); the PNG is a
    figure (image plus labels), so no pixel spacing is given.
    """
    import highdicom as hd
    from PIL import Image
    from pydicom.uid import generate_uid

    with Image.open(png_path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    t = np.asarray(result.sagittal.transform)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_dataset, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=(_orientation_letter(t[:3, 0]), _orientation_letter(t[:3, 1])),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = "bmd_d2 overlay"
    return sc


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def _save(ds, path: str):
    from .report import atomic_path

    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_dicom_outputs(result: StudyResult, out_dir: str, kinds: Sequence[str] = KINDS,
                        overlay_png: Optional[str] = None) -> Dict[str, str]:
    """Write the requested DICOM objects into ``out_dir`` (each atomically).

    Args:
        result: a measured DICOM study.
        out_dir: the study's output folder.
        kinds: any of ``"seg"``, ``"sr"``, ``"sc"``. The SR references the SEG only when the SEG is written too.
        overlay_png: the overlay PNG for the SC (default: rendered to a temporary file).

    Returns:
        name (``dicom_seg``, ``dicom_sr``, ``dicom_sc``) → path of the files written. An empty SEG (nothing
        measured) is skipped with a warning.

    Raises:
        DicomOutputsUnavailable: not a DICOM input (NIfTI) or the source images cannot be re-read.
    """
    kinds = [k for k in KINDS if k in set(kinds)]
    datasets = read_source_datasets(result)
    paths: Dict[str, str] = {}
    seg, numbers = None, None
    if "seg" in kinds:
        seg, numbers = build_segmentation(result, datasets)
        if seg is None:
            logger.warning("%s: no measured vertebra: DICOM SEG not written", result.study_id)
        else:
            paths["dicom_seg"] = os.path.join(out_dir, SEG_FILE)
            _save(seg, paths["dicom_seg"])
    if "sr" in kinds:
        paths["dicom_sr"] = os.path.join(out_dir, SR_FILE)
        _save(build_report(result, seg, numbers, datasets), paths["dicom_sr"])
    if "sc" in kinds:
        paths["dicom_sc"] = os.path.join(out_dir, SC_FILE)
        if overlay_png and os.path.isfile(overlay_png):
            _save(build_overlay_sc(result, overlay_png, datasets[0]), paths["dicom_sc"])
        else:
            from .report import write_overlay

            fd, tmp = tempfile.mkstemp(prefix=".overlay.", suffix=".png", dir=out_dir)
            os.close(fd)
            try:
                write_overlay(result, tmp)
                _save(build_overlay_sc(result, tmp, datasets[0]), paths["dicom_sc"])
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return paths


def write_if_possible(result: StudyResult, out_dir: str, kinds: Sequence[str],
                      overlay_png: Optional[str] = None) -> Dict[str, str]:
    """:func:`write_dicom_outputs` for the report writer: a non-DICOM input is a warning (nothing written).

    Raises:
        BMDError: the objects could not be built from a DICOM input (one line, names the study).
    """
    from bmd_d2.errors import BMDError

    try:
        return write_dicom_outputs(result, out_dir, kinds, overlay_png=overlay_png)
    except DicomOutputsUnavailable as e:
        logger.warning("%s: DICOM outputs skipped: %s", result.study_id, e)
        return {}
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom rejects odd source geometry/headers
        raise BMDError(f"study {result.study_id}: cannot write DICOM outputs ({type(e).__name__}: {e})") from e
