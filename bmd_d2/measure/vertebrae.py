"""From the model's detections on one sagittal image to a :class:`~bmd_d2.measure.result.StudyResult`.

Everything after the model, on plain arrays, in four steps of small functions (unit tests call them with synthetic
detections or ground-truth masks):

1. **Reject** (:func:`screen_detections`): below the score threshold, unknown class, implausible size, no spine in
   the image, not bone (sagittal ROI HU or the mask's bone content) — each rejection is recorded with its reason;
   the sagittal ROI (:func:`~bmd_d2.measure.classical.erode_roi_ellipse`) is measured here because its HU decides
   ``not_bone``.
2. **Label** (:func:`label_vertebrae`): the level rule (:func:`bmd_d2.levels.assign_levels`) names the kept bodies
   from the detector's sacrum and the sacrum and last rib found in 3-D (:func:`find_level_anchors`), cross-checked,
   and may reject more (e.g. a second sacrum); :func:`levels_record` is what result.json says about it.
3. **Measure** (:func:`measure_vertebra`): per labelled vertebra the 3-D core, the classical BMD through the
   calibration, the learned BMD, the reported value and category, the heights.
4. **Grade** (:func:`grade_heights`, :func:`study_qc`, :func:`~bmd_d2.measure.patient.patient_values`): height loss
   against the neighbours, study flags and contrast phase, the patient-level ACR value.

:func:`measure_detections` runs the four steps.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bmd_d2.levels import (SACRUM_CLASS, VERTEBRAL_BODY_CLASS, Detection, LevelAssignment, RibLevel, SacrumLevel,
                           add_flag, assign_levels)

from .anchors import (RibAnchor, SacrumAnchor, find_ribs, find_sacrum, plane_of_sagittal, rib_level, sacrum_level,
                      spine_grid)

from .categories import acr_category
from .classical import (Calibration, Core3D, calibration_from_cfg, calibration_method, core_min_rows_erosion_mm,
                        core_volume_reason, erode_roi_ellipse, measure_core_3d, sagittal_roi_hu, slice_thickness_mm,
                        study_calibration, trim_dense_rim, vertebral_heights)
from .patient import patient_values
from .qc import contrast_check, genant_grade, height_loss, mask_has_bone, metal_in_mask, volume_flags
from .result import StudyResult, VertebraResult

__all__ = [
    "WITHHOLDING_FLAGS", "RoiGeometry", "Candidate", "detection_arrays", "fov_rows", "describe_study",
    "roi_geometry", "screen_detection", "screen_detections", "find_level_anchors", "label_vertebrae", "levels_record",
    "measure_vertebra", "grade_heights",
    "study_qc", "measure_detections",
]

# Vertebra flags whose BMD values are withheld (not trustworthy at all).
WITHHOLDING_FLAGS = ("implausible_hu", "metal")
# Calibration flags (Calibration.flags) every vertebra of the study carries; all of them are study flags too.
_VERTEBRA_CALIBRATION_FLAGS = ("uncalibrated", "calibration_fallback")
# Vertebra flags that, raised on any vertebra, are raised for the study as well.
_STUDY_FROM_VERTEBRA_FLAGS = ("metal", "very_dense", "vertebral_height_loss", "low_confidence")
_STUDY_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "Modality", "KVP",
               "Manufacturer", "SliceThickness", "source", "format")


@dataclass
class RoiGeometry:
    """The erosions and the 3-D core's possibility for one study (pixels of the sagittal image).

    Attributes:
        spacing_mm: sagittal pixel size.
        radius_px: antero-posterior erosion (``MEASURE.EROSION_MM``).
        radius_rows_px: superior–inferior erosion of the sagittal ROI (plus ``EROSION_SLICE_FRACTION`` × slice
            thickness).
        core_rows_px: least superior–inferior erosion of the 3-D core's ROI (0 when there is no core).
        core_reason, core_detail: why no vertebra of the study gets a 3-D core (None, "" when they may).
    """

    spacing_mm: float
    radius_px: float
    radius_rows_px: float
    core_rows_px: float
    core_reason: Optional[str]
    core_detail: str


@dataclass
class Candidate:
    """A detection that passed the screening, with its sagittal ROI measurement.

    Attributes:
        index: its row in the detection arrays.
        flags: vertebra flags raised while screening (in the order raised).
        roi: bool ``(H, W)`` eroded ROI.
        hu, sd, n: mean and SD HU in the ROI over the sagittal slices and the pixels averaged (None, None, 0 for a
            too small ROI).
        rim_trimmed: pixels of a dense rim taken out of the eroded ROI (:func:`trim_dense_rim`).
    """

    index: int
    flags: List[str] = field(default_factory=list)
    roi: Optional[np.ndarray] = None
    rim_trimmed: int = 0
    hu: Optional[float] = None
    sd: Optional[float] = None
    n: int = 0


def _float(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _rejection(dets: Dict[str, Any], r: int, reason: str) -> Dict[str, Any]:
    return {"box_xyxy": dets["boxes"][r].tolist(), "score": float(dets["scores"][r]),
            "category_id": int(dets["classes"][r]), "reason": reason}


def detection_arrays(detections: Dict[str, Any], image_hw: Tuple[int, int]) -> Dict[str, Any]:
    """The detections as arrays of fixed types: ``boxes`` float64 ``(R, 4)``, ``scores`` ``(R,)``, ``classes`` int64
    ``(R,)``, ``masks`` bool ``(R, H, W)``, ``bmd``, ``hu`` (the learned trabecular HU) and ``hu_correction`` (the
    learned correction of the measured core HU) as given (or None).

    Raises:
        ValueError: no ``masks`` (the model was built without ``MODEL.MASK_ON``).
    """
    H, W = image_hw
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    R = len(scores)
    masks = detections.get("masks")
    if masks is None:
        raise ValueError("measure_detections needs masks (MODEL.MASK_ON)")
    return {"boxes": np.asarray(detections["boxes"], dtype=np.float64).reshape(-1, 4), "scores": scores,
            "classes": np.asarray(detections["classes"], dtype=np.int64).reshape(-1),
            "masks": np.asarray(masks, dtype=bool).reshape(R, H, W), "bmd": detections.get("bmd"),
            "hu": detections.get("hu"), "hu_correction": detections.get("hu_correction")}


def fov_rows(sagittal) -> Optional[tuple]:
    """``(first, last)`` image rows holding scanned anatomy (not padding), from ``info["pad_px"]``; None if unknown."""
    info = getattr(sagittal, "info", None) or {}
    pad = info.get("pad_px") if isinstance(info, dict) else None
    if not pad:
        return None
    H = np.asarray(sagittal.hu).shape[1]
    return int(pad.get("top", 0)), int(H - 1 - pad.get("bottom", 0))


def describe_study(result: StudyResult, volume, sagittal) -> bool:
    """Record the study identifiers, the loader's warnings and the plane method in ``result``.

    Returns:
        whether no spine was found (the sagittal plane fell back to the volume's centre): then nothing is measured.
    """
    if volume is not None:
        result.study = {k: volume.meta.get(k) for k in _STUDY_KEYS if volume.meta.get(k) not in (None, "")}
        result.study["warnings"] = list(volume.warnings)
        if volume.warnings:
            result.qc_flags.append("volume_warning")
        for f in volume_flags(volume.warnings):
            add_flag(result.qc_flags, f)
    sag_info = getattr(sagittal, "info", None) or {}
    plane_method = (sag_info.get("plane") or {}).get("method") if isinstance(sag_info, dict) else None
    result.qc["plane_method"] = plane_method
    spine_missing = plane_method == "fallback"
    if spine_missing:
        add_flag(result.qc_flags, "spine_not_found")
    return spine_missing


def roi_geometry(m, spacing_mm: float, volume) -> RoiGeometry:
    """The study's erosions (``MEASURE.EROSION_MM``, ``EROSION_SLICE_FRACTION``, ``CORE_MIN_EROSION_SLICES``) in pixels
    of spacing ``spacing_mm``, and whether ``volume`` allows a 3-D core (``MEASURE.CORE_MAX_SPACING_MM``)."""
    sp = float(spacing_mm)
    core_reason, core_detail = core_volume_reason(volume, float(m.CORE_MAX_SPACING_MM))
    return RoiGeometry(
        spacing_mm=sp, radius_px=float(m.EROSION_MM) / sp,
        radius_rows_px=(float(m.EROSION_MM) + float(m.EROSION_SLICE_FRACTION) * slice_thickness_mm(volume)) / sp,
        core_rows_px=0.0 if core_reason else core_min_rows_erosion_mm(volume, float(m.CORE_MIN_EROSION_SLICES)) / sp,
        core_reason=core_reason, core_detail=core_detail)


def _size_reason(category: int, area_mm2: float, m) -> Optional[str]:
    if category not in (VERTEBRAL_BODY_CLASS, SACRUM_CLASS):
        return "unknown_class"
    if area_mm2 < float(m.MIN_AREA_MM2) or (category == VERTEBRAL_BODY_CLASS and area_mm2 > float(m.MAX_AREA_MM2)):
        return "implausible_size"
    return None


def screen_detection(mask: np.ndarray, score: float, category: int, hu3: np.ndarray, m, geometry: RoiGeometry, *,
                     spine_missing: bool = False, volume=None, transform: Optional[np.ndarray] = None,
                     index: int = 0) -> Tuple[Optional[str], Candidate]:
    """Screen one detection above the score threshold and measure its sagittal ROI.

    Args:
        mask: bool ``(H, W)``; ``score``, ``category``: its score and class.
        hu3: float ``(S, H, W)`` sagittal HU.
        m: the ``MEASURE`` config section.
        geometry: from :func:`roi_geometry`.
        spine_missing: no spine in the image (every detection is rejected).
        volume, transform: the source ``Volume`` and the sagittal transform, for the metal check through the volume.
        index: the detection's row, stored in the candidate.

    Returns:
        ``(reason, candidate)``: the rejection reason (``unknown_class``, ``implausible_size``, ``spine_not_found``,
        ``not_bone``) or None, and the candidate with its flags (``roi_too_small``, ``implausible_hu``,
        ``very_dense``, ``metal``, ``low_confidence``) and ROI values.
    """
    reason = _size_reason(category, float(mask.sum()) * geometry.spacing_mm * geometry.spacing_mm, m)
    if reason is None and spine_missing:
        reason = "spine_not_found"
    cand = Candidate(index)
    if reason is not None:
        return reason, cand
    cand.roi = erode_roi_ellipse(mask, geometry.radius_px, geometry.radius_rows_px)
    cand.roi, cand.rim_trimmed = trim_dense_rim(cand.roi, hu3, geometry.spacing_mm, float(m.RIM_TRIM_MM),
                                                float(m.RIM_DENSE_HU), int(m.MIN_ROI_PIXELS))
    if int(cand.roi.sum()) < int(m.MIN_ROI_PIXELS):
        cand.flags.append("roi_too_small")
    else:
        cand.hu, cand.sd, cand.n = sagittal_roi_hu(hu3, cand.roi)
        if cand.hu is not None and cand.hu < float(m.PLAUSIBLE_HU[0]):
            reason = "not_bone"
        elif cand.hu is not None and cand.hu > float(m.PLAUSIBLE_HU[1]):
            cand.flags.append("implausible_hu")
        elif cand.hu is not None and cand.hu > float(m.DENSE_HU):
            cand.flags.append("very_dense")
    if reason is None and not mask_has_bone(hu3, mask, float(m.MIN_BONE_HU))[0]:
        reason = "not_bone"
    if reason is None and metal_in_mask(hu3, mask, float(m.METAL_HU), volume=volume, transform=transform,
                                        half_width_mm=float(m.CORE_HALF_WIDTH_MM)):
        cand.flags.append("metal")
    if score < float(m.LOW_CONFIDENCE_SCORE):
        cand.flags.append("low_confidence")
    return reason, cand


def screen_detections(dets: Dict[str, Any], hu3: np.ndarray, m, geometry: RoiGeometry, **kwargs
                      ) -> Tuple[List[Candidate], List[Dict[str, Any]]]:
    """:func:`screen_detection` for every detection at or above ``MEASURE.SCORE_THRESHOLD``, highest score first.

    Args:
        dets: from :func:`detection_arrays`.
        kwargs: ``spine_missing``, ``volume``, ``transform`` as :func:`screen_detection` takes them.

    Returns:
        ``(candidates, rejected)``: the kept detections in that order and one record per rejected one.
    """
    kept, rejected = [], []
    scores = dets["scores"]
    for r in np.argsort(-scores, kind="stable"):
        r = int(r)
        if scores[r] < m.SCORE_THRESHOLD:
            continue
        reason, cand = screen_detection(dets["masks"][r], float(scores[r]), int(dets["classes"][r]), hu3, m,
                                        geometry, index=r, **kwargs)
        if reason:
            rejected.append(_rejection(dets, r, reason))
        else:
            kept.append(cand)
    return kept, rejected


def find_level_anchors(volume, sagittal) -> Tuple[Optional[RibAnchor], Optional[SacrumAnchor]]:
    """The ribs and the sacrum in view (:func:`bmd_d2.measure.anchors.find_ribs`, :func:`~.anchors.find_sacrum`, on
    one shared coarse grid) along the plane ``sagittal`` was cut on; ``(None, None)`` without a volume or a recorded
    plane, None for an anchor not found."""
    plane = plane_of_sagittal(sagittal) if volume is not None else None
    grid = spine_grid(volume, plane) if plane is not None else None
    if grid is None:
        return None, None
    return find_ribs(volume, plane, grid=grid), find_sacrum(volume, plane, grid=grid)


def levels_record(la: LevelAssignment, ribs: Optional[RibAnchor],
                  sacrum: Optional[SacrumAnchor] = None) -> Dict[str, Any]:
    """What result.json says about the level count (``levels``): ``levels_anchor`` ("sacrum+rib", "sacrum", "rib" or
    None), ``sacrum_source`` ("detector", "3d", "detector+3d" or None), ``level_labelings`` (anchor → levels of the
    reported vertebrae, cranial → caudal), ``rib_pairs_in_view``, ``convention`` (one line: what the reported levels
    are counted from), ``rib_anchor`` (the rib pairs found) and ``sacrum_anchor`` (the sacroiliac joints found)."""
    if la.anchor is None:
        convention = "no anchor: " + ("lowest body called L5 (fallback)" if any(la.levels) else "no level named")
    else:
        convention = {"sacrum": "counted up from the sacrum (the lowest free body is L5)",
                      "rib": "counted from the last rib (the lowest rib-bearing vertebra is T12)",
                      "sacrum+rib": "sacrum and last rib agree"}[la.anchor]
        if "level_count_conflict" in la.study_flags:
            others = sorted(k for k in la.labelings if k != la.anchor)
            convention += "; the anchors disagree (" + ", ".join(f"level_labelings.{k}" for k in others) + \
                "): a transitional vertebra, 11 or 13 rib pairs, or a wrong anchor"
    rib = None
    if ribs is not None:
        rib = {k: v for k, v in ribs.to_dict().items() if k != "evidence"}
    return {"levels_anchor": la.anchor, "sacrum_source": la.sacrum_source, "level_labelings": la.labelings,
            "rib_pairs_in_view": la.rib_pairs_in_view, "convention": convention, "rib_anchor": rib,
            "sacrum_anchor": sacrum.to_dict() if sacrum is not None else None}


def label_vertebrae(dets: Dict[str, Any], candidates: Sequence[Candidate], sagittal, m,
                    ribs: Optional[RibLevel] = None, sacrum3d: Optional[SacrumLevel] = None
                    ) -> Tuple[List[Detection], LevelAssignment, List[Dict[str, Any]]]:
    """Name the candidates' levels (:func:`bmd_d2.levels.assign_levels`, ``MEASURE.UNANCHORED_LEVEL_RULE``), with
    the rib anchor ``ribs`` (:func:`bmd_d2.measure.anchors.rib_level`) and the 3-D sacrum ``sacrum3d``
    (:func:`bmd_d2.measure.anchors.sacrum_level`) when found.

    Returns:
        ``(detections, assignment, rejected)``: one level-rule ``Detection`` per candidate (its centroid is the
        mask's), the assignment, and a record per candidate the rule rejected.
    """
    H, W = np.asarray(sagittal.hu).shape[1:]
    found = []
    for c in candidates:
        rows, cols = np.nonzero(dets["masks"][c.index])
        found.append(Detection(int(dets["classes"][c.index]), float(dets["scores"][c.index]),
                               tuple(float(v) for v in dets["boxes"][c.index]),
                               (float(cols.mean()), float(rows.mean()))))
    la = assign_levels(found, pixel_spacing_mm=float(sagittal.spacing), image_shape=(H, W),
                       fov_rows=fov_rows(sagittal), rule=m.UNANCHORED_LEVEL_RULE, ribs=ribs, sacrum3d=sacrum3d)
    rejected = [_rejection(dets, candidates[k].index, reason) for k, reason in la.rejected.items()]
    return found, la, rejected


def _core(cand: Candidate, mask: np.ndarray, geometry: RoiGeometry, volume, transform: np.ndarray, m) -> Core3D:
    if geometry.core_reason is not None:
        return Core3D(reason=geometry.core_reason, detail=geometry.core_detail)
    if cand.hu is None:
        return Core3D(reason="no_roi", detail="the sagittal ROI is too small (roi_too_small)")
    # the sagittal ROI, unless the slice spacing asks for a deeper one (spacing 5 mm; up to 4 mm it never does)
    roi = cand.roi if geometry.core_rows_px <= geometry.radius_rows_px else \
        erode_roi_ellipse(mask, geometry.radius_px, geometry.core_rows_px) & cand.roi
    return measure_core_3d(volume, transform, roi, float(m.CORE_HALF_WIDTH_MM), int(m.MIN_ROI_PIXELS),
                           rim_mm=float(m.RIM_TRIM_MM), rim_dense_hu=float(m.RIM_DENSE_HU))


def primary_value(v: VertebraResult, primary: str) -> Optional[float]:
    """The reported BMD of ``v`` under ``MEASURE.PRIMARY_BMD``: "learned", "classical" (sagittal ROI) or
    "classical_3d" (the 3-D core where measured, else the sagittal ROI; such a vertebra carries ``no_3d_core``)."""
    if primary == "learned":
        return v.learned_bmd
    if primary == "classical_3d" and v.classical_bmd_3d is not None:
        return v.classical_bmd_3d
    return v.classical_bmd


def measure_vertebra(dets: Dict[str, Any], cand: Candidate, found: Detection, level: Optional[str],
                     level_flags: Sequence[str], calibration: Calibration, m, geometry: RoiGeometry, *, volume=None,
                     transform: np.ndarray) -> VertebraResult:
    """The result of one labelled vertebra: 3-D core, classical and learned BMD, reported value, category, heights.

    Args:
        dets: from :func:`detection_arrays`; ``cand``: the vertebra's candidate; ``found``: its level-rule detection.
        level, level_flags: its level name and the level rule's flags for it.
        calibration: HU → BMD.
        m: the ``MEASURE`` config section; ``geometry``: from :func:`roi_geometry`.
        volume, transform: the source ``Volume`` (for the 3-D core) and the sagittal transform.
    """
    r = cand.index
    mask = dets["masks"][r]
    cx, cy = found.centroid
    v = VertebraResult(level=level, category_id=int(dets["classes"][r]), score=float(dets["scores"][r]),
                       box_xyxy=[float(x) for x in dets["boxes"][r]], mask=mask, centroid_px=[cx, cy],
                       centroid_lps=(transform @ [cx, cy, 0.0, 1.0])[:3].tolist())
    v.qc_flags = list(level_flags) + cand.flags
    v.trabecular_hu, v.trabecular_hu_sd, v.roi_pixels = cand.hu, cand.sd, int(cand.n)
    slices = int(cand.n) // int(cand.roi.sum()) if cand.n else 0  # cand.n counts the ROI on every sagittal slice
    v.roi_rim_trimmed = int(cand.rim_trimmed) * slices
    core = _core(cand, mask, geometry, volume, transform, m)
    v.trabecular_hu_3d, v.roi_voxels_3d, v.roi_rim_trimmed_3d = core.hu, core.n, core.trimmed
    v.core_3d_reason, v.core_3d_detail = core.reason, core.detail
    if v.trabecular_hu_3d is None:
        v.qc_flags.append("no_3d_core")
    withhold = any(f in v.qc_flags for f in WITHHOLDING_FLAGS)
    if dets.get("hu_correction") is not None:  # a head that learned the measurement's bias: measured HU corrected
        v.learned_hu_correction = _float(dets["hu_correction"][r])
        measured = v.trabecular_hu_3d if v.trabecular_hu_3d is not None else v.trabecular_hu
        if measured is not None and v.learned_hu_correction is not None:
            v.learned_hu = measured + v.learned_hu_correction
        v.learned_bmd = _float(calibration.hu_to_bmd(v.learned_hu))
    elif dets.get("hu") is not None:  # a head that learned the trabecular HU: converted by the study's calibration
        v.learned_hu = _float(dets["hu"][r])
        v.learned_bmd = _float(calibration.hu_to_bmd(v.learned_hu))
    else:
        v.learned_bmd = _float(dets["bmd"][r]) if dets["bmd"] is not None else None
    if withhold:  # metal or implausible HU in the core: the model's value is as wrong as the ROI's (learned_hu kept)
        v.learned_bmd = None
    else:
        v.classical_bmd = _float(calibration.hu_to_bmd(v.trabecular_hu))
        v.classical_bmd_3d = _float(calibration.hu_to_bmd(v.trabecular_hu_3d))
        v.classical_bmd_sd = _float(calibration.bmd_sd(v.trabecular_hu))
        v.classical_bmd_3d_sd = _float(calibration.bmd_sd(v.trabecular_hu_3d))
    for f in calibration.flags:  # uncalibrated, calibration_fallback, ...: on every vertebra of the study
        if f in _VERTEBRA_CALIBRATION_FLAGS:
            add_flag(v.qc_flags, f)
    if v.learned_bmd is not None and v.classical_bmd is not None:
        v.bmd_difference = v.learned_bmd - v.classical_bmd
        if abs(v.bmd_difference) > float(m.MAX_BMD_DIFFERENCE):
            v.qc_flags.append("large_learned_classical_difference")
    if not withhold:
        v.bmd = primary_value(v, m.PRIMARY_BMD)
    if v.category_id == VERTEBRAL_BODY_CLASS:
        v.category = acr_category(v.bmd)
        v.heights_mm = vertebral_heights(mask, geometry.spacing_mm)
    return v


def grade_heights(vertebrae: Sequence[VertebraResult], thresholds: Sequence[float], fov: Optional[tuple] = None):
    """Set ``height_loss_pct``/``genant_grade`` of every vertebral body (neighbours: up to 2 bodies each side).

    Bodies cut by the image edge or the scanned range (mask within 2 rows of ``fov`` = first/last scanned row) are
    not graded (their height is the scan's, not the vertebra's) and are not used as neighbours.
    """
    def cut(v: VertebraResult) -> bool:
        if "truncated_by_image_edge" in v.qc_flags or v.mask is None:
            return True
        if fov is None:
            return False
        rows = np.nonzero(v.mask.any(1))[0]
        return rows.size == 0 or rows[0] <= fov[0] + 2 or rows[-1] >= fov[1] - 2

    bodies = [v for v in vertebrae if v.category_id == VERTEBRAL_BODY_CLASS and not cut(v)]
    for i, v in enumerate(bodies):
        nb = [b.heights_mm for b in bodies[max(0, i - 2):i] + bodies[i + 1:i + 3]]
        loss = height_loss(v.heights_mm or {}, nb)
        v.height_loss_pct = None if loss is None else round(100.0 * loss, 1)
        v.genant_grade = genant_grade(loss, thresholds)
        if v.genant_grade:
            v.qc_flags.append("vertebral_height_loss")


def study_qc(result: StudyResult, volume, transform: np.ndarray, contrast_hu: float):
    """Raise the study flags of its vertebrae's flags (metal, very dense, height loss, low confidence) and check the
    contrast phase in ``volume`` (``result.qc["contrast"]``, flag ``contrast_enhanced``)."""
    for f in _STUDY_FROM_VERTEBRA_FLAGS:
        if any(f in v.qc_flags for v in result.vertebrae):
            add_flag(result.qc_flags, f)
    if volume is not None:
        result.qc["contrast"] = contrast_check(volume, result.vertebrae, transform, float(contrast_hu))
        if result.qc["contrast"]["enhanced"]:
            add_flag(result.qc_flags, "contrast_enhanced")


def measure_detections(detections: Dict[str, Any], sagittal, cfg, *, volume=None,
                       calibration: Optional[Calibration] = None, study_id: str = "study") -> StudyResult:
    """Turn the model's detections on one sagittal image into a :class:`StudyResult` (the steps in the module
    docstring).

    Args:
        detections: ``boxes`` ``(R, 4)`` XYXY pixels, ``scores`` ``(R,)``, ``classes`` ``(R,)`` (0 vertebral body,
            1 sacrum), ``masks`` bool ``(R, H, W)``, ``bmd`` ``(R,)`` mg/cm³ or None (then learned BMD is None).
        sagittal: the ``SagittalImage`` the detections refer to (``hu`` ``(3, H, W)``, ``transform``, ``spacing``).
        cfg: config with the ``MEASURE`` section.
        volume: the source ``Volume`` (for the 3-D core and study identifiers); None skips them.
        calibration: HU → BMD calibration, used as given; default: the one ``MEASURE.CALIBRATION`` selects — the
            internal calibration of ``volume`` at the labelled vertebral bodies (:func:`study_calibration`), or
            ``calibration_from_cfg(cfg, volume.data)`` (file or linear default).
        study_id: id stored in the result.

    Returns:
        The study result; vertebrae cranial → caudal, the sacrum last.
    """
    m = cfg.MEASURE
    internal = calibration is None and calibration_method(cfg) == "internal"
    if calibration is None:
        calibration = calibration_from_cfg(cfg, volume.data if volume is not None else None)
    hu3 = np.asarray(sagittal.hu)
    dets = detection_arrays(detections, hu3.shape[1:])
    result = StudyResult(study_id=study_id, calibration=calibration.to_dict(), sagittal=sagittal, volume=volume)
    spine_missing = describe_study(result, volume, sagittal)
    scores = dets["scores"]
    result.model = {"score_threshold": float(m.SCORE_THRESHOLD), "primary_bmd": m.PRIMARY_BMD,
                    "detections": int(len(scores)), "below_threshold": int(np.sum(scores < m.SCORE_THRESHOLD))}
    transform = np.asarray(sagittal.transform, dtype=np.float64)
    geometry = roi_geometry(m, float(sagittal.spacing), volume)

    candidates, rejected = screen_detections(dets, hu3, m, geometry, spine_missing=spine_missing, volume=volume,
                                             transform=transform)
    result.rejected.extend(rejected)
    rib_anchor, sacrum_anchor = (None, None) if spine_missing else find_level_anchors(volume, sagittal)
    found, la, rejected = label_vertebrae(dets, candidates, sagittal, m,
                                          rib_level(rib_anchor, sagittal) if rib_anchor is not None else None,
                                          sacrum_level(sacrum_anchor, sagittal) if sacrum_anchor is not None else None)
    result.rejected.extend(rejected)
    result.levels = levels_record(la, rib_anchor, sacrum_anchor)
    for f in la.study_flags:
        add_flag(result.qc_flags, f)
    if internal and la.order:  # the reference tissues are measured at the labelled vertebral bodies
        bodies = [k for k in la.order if found[k].category == VERTEBRAL_BODY_CLASS] or list(la.order)
        spine = [(transform @ [found[k].centroid[0], found[k].centroid[1], 0.0, 1.0])[:3] for k in bodies]
        calibration = study_calibration(cfg, volume, np.asarray(spine))
        result.calibration = calibration.to_dict()
    if la.order:
        for f in calibration.flags:
            add_flag(result.qc_flags, f)
    for k in la.order:
        result.vertebrae.append(measure_vertebra(dets, candidates[k], found[k], la.levels[k], la.flags[k],
                                                 calibration, m, geometry, volume=volume, transform=transform))
    grade_heights(result.vertebrae, [float(t) for t in m.HEIGHT_LOSS_GRADES], fov_rows(sagittal))
    study_qc(result, volume, transform, m.CONTRAST_HU)
    result.patient = patient_values(result.vertebrae, result.qc_flags, m.PRIMARY_BMD)
    return result
