"""Measure a CT study: volume → sagittal image → Detectron2 model → level labels, learned and classical BMD.

Two layers:

* :func:`measure_detections` — everything after the model, on plain arrays: score threshold, sanity checks, level
  labels, classical HU in the eroded mask (sagittal and 3-D core), calibration, categories, patient-level values.
  Unit tests call it with synthetic detections or ground-truth masks.
* :class:`BMDStudyPredictor` — wraps Detectron2's ``DefaultPredictor``: a DICOM folder/file(s), NIfTI path or
  ``Volume`` in, :class:`~bmd_d2.measure.result.StudyResult` out.
"""
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from bmd_d2.data.levels import SACRUM_CLASS, VERTEBRAL_BODY_CLASS
from bmd_d2.errors import BMDError

from .categories import acr_category, hu_category
from .classical import (Calibration, calibration_from_cfg, core_hu_3d, core_points_lps, erode_mask,
                        sagittal_roi_hu, slice_thickness_mm, vertebral_heights)
from .levels import Detection, assign_levels
from .qc import contrast_check, genant_grade, height_loss, mask_has_bone, metal_in_mask, volume_flags
from .result import StudyResult, VertebraResult

logger = logging.getLogger(__name__)

ACR_PREFERRED = ("L1", "L2")
ACR_CANDIDATES = ("L1", "L2", "L3", "L4")
# Vertebra flags that make a vertebra unusable for the patient-level ACR value.
ACR_EXCLUDING_FLAGS = ("implausible_hu", "truncated_by_image_edge", "roi_too_small", "metal", "very_dense",
                       "vertebral_height_loss")
# Vertebra flags whose BMD values are withheld (not trustworthy at all).
WITHHOLDING_FLAGS = ("implausible_hu", "metal")
_STUDY_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "Modality", "KVP",
               "Manufacturer", "SliceThickness", "source", "format")


def instances_to_arrays(instances) -> Dict[str, Optional[np.ndarray]]:
    """Detectron2 ``Instances`` (on any device) → dict of NumPy arrays.

    Returns:
        ``boxes`` float ``(R, 4)`` XYXY, ``scores`` ``(R,)``, ``classes`` int ``(R,)``, ``masks`` bool ``(R, H, W)``
        (None without ``pred_masks``), ``bmd`` float ``(R,)`` mg/cm³ (None without ``pred_bmd``).
    """
    inst = instances.to("cpu")
    out = {
        "boxes": inst.pred_boxes.tensor.numpy().astype(np.float64),
        "scores": inst.scores.numpy().astype(np.float64),
        "classes": inst.pred_classes.numpy().astype(np.int64),
        "masks": inst.pred_masks.numpy().astype(bool) if inst.has("pred_masks") else None,
        "bmd": inst.pred_bmd.numpy().astype(np.float64).reshape(-1) if inst.has("pred_bmd") else None,
    }
    return out


def _float(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def measure_detections(detections: Dict[str, Any], sagittal, cfg, *, volume=None,
                       calibration: Optional[Calibration] = None, study_id: str = "study") -> StudyResult:
    """Turn the model's detections on one sagittal image into a :class:`StudyResult`.

    Args:
        detections: ``boxes`` ``(R, 4)`` XYXY pixels, ``scores`` ``(R,)``, ``classes`` ``(R,)`` (0 vertebral body,
            1 sacrum), ``masks`` bool ``(R, H, W)``, ``bmd`` ``(R,)`` mg/cm³ or None (then learned BMD is None).
        sagittal: the ``SagittalImage`` the detections refer to (``hu`` ``(3, H, W)``, ``transform``, ``spacing``).
        cfg: config with the ``MEASURE`` section.
        volume: the source ``Volume`` (for the 3-D core and study identifiers); None skips them.
        calibration: HU → BMD calibration; default ``calibration_from_cfg(cfg, volume.data)``.
        study_id: id stored in the result.

    Returns:
        The study result; vertebrae cranial → caudal, the sacrum last.
    """
    m = cfg.MEASURE
    if calibration is None:
        calibration = calibration_from_cfg(cfg, volume.data if volume is not None else None)
    hu3 = np.asarray(sagittal.hu)
    H, W = hu3.shape[1:]
    sp = float(sagittal.spacing)
    boxes = np.asarray(detections["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    classes = np.asarray(detections["classes"], dtype=np.int64).reshape(-1)
    masks = detections.get("masks")
    bmd = detections.get("bmd")
    R = len(scores)
    if masks is None:
        raise ValueError("measure_detections needs masks (MODEL.MASK_ON)")
    masks = np.asarray(masks, dtype=bool).reshape(R, H, W)

    result = StudyResult(study_id=study_id, calibration=calibration.to_dict(), sagittal=sagittal, volume=volume)
    if volume is not None:
        result.study = {k: volume.meta.get(k) for k in _STUDY_KEYS if volume.meta.get(k) not in (None, "")}
        result.study["warnings"] = list(volume.warnings)
        if volume.warnings:
            result.qc_flags.append("volume_warning")
        for f in volume_flags(volume.warnings):
            _add(result.qc_flags, f)
    sag_info = getattr(sagittal, "info", None) or {}
    plane_method = (sag_info.get("plane") or {}).get("method") if isinstance(sag_info, dict) else None
    spine_missing = plane_method == "fallback"
    result.qc["plane_method"] = plane_method
    if spine_missing:
        _add(result.qc_flags, "spine_not_found")
    transform = np.asarray(sagittal.transform, dtype=np.float64)
    result.model = {"score_threshold": float(m.SCORE_THRESHOLD), "primary_bmd": m.PRIMARY_BMD,
                    "detections": int(R), "below_threshold": int(np.sum(scores < m.SCORE_THRESHOLD))}
    lo_hu, hi_hu = float(m.PLAUSIBLE_HU[0]), float(m.PLAUSIBLE_HU[1])
    radius_px = float(m.EROSION_MM) / sp
    radius_rows_px = (float(m.EROSION_MM) + float(m.EROSION_SLICE_FRACTION) * slice_thickness_mm(volume)) / sp
    use_core = volume is not None and max(volume.spacing) <= float(m.CORE_MAX_SPACING_MM)

    cand: List[int] = []
    pre: Dict[int, Dict[str, Any]] = {}
    for r in np.argsort(-scores, kind="stable"):
        r = int(r)
        if scores[r] < m.SCORE_THRESHOLD:
            continue
        reason = None
        area_mm2 = float(masks[r].sum()) * sp * sp
        if classes[r] not in (VERTEBRAL_BODY_CLASS, SACRUM_CLASS):
            reason = "unknown_class"
        elif area_mm2 < float(m.MIN_AREA_MM2):
            reason = "implausible_size"
        elif classes[r] == VERTEBRAL_BODY_CLASS and area_mm2 > float(m.MAX_AREA_MM2):
            reason = "implausible_size"
        elif spine_missing:
            reason = "spine_not_found"
        info: Dict[str, Any] = {"flags": []}
        if reason is None:
            roi = erode_mask(masks[r], radius_px, radius_rows_px)
            info["roi"] = roi
            if int(roi.sum()) < int(m.MIN_ROI_PIXELS):
                info["flags"].append("roi_too_small")
                info["hu"] = info["sd"] = None
                info["n"] = 0
            else:
                info["hu"], info["sd"], info["n"] = sagittal_roi_hu(hu3, roi)
                if info["hu"] is not None and info["hu"] < lo_hu:
                    reason = "not_bone"
                elif info["hu"] is not None and info["hu"] > hi_hu:
                    info["flags"].append("implausible_hu")
                elif info["hu"] is not None and info["hu"] > float(m.DENSE_HU):
                    info["flags"].append("very_dense")
            if reason is None and not mask_has_bone(hu3, masks[r], float(m.MIN_BONE_HU))[0]:
                reason = "not_bone"
            if reason is None and metal_in_mask(hu3, masks[r], float(m.METAL_HU), volume=volume,
                                                transform=transform, half_width_mm=float(m.CORE_HALF_WIDTH_MM)):
                info["flags"].append("metal")
            if scores[r] < float(m.LOW_CONFIDENCE_SCORE):
                info["flags"].append("low_confidence")
        if reason:
            result.rejected.append({"box_xyxy": boxes[r].tolist(), "score": float(scores[r]),
                                    "category_id": int(classes[r]), "reason": reason})
            continue
        cand.append(r)
        pre[r] = info

    dets = []
    for r in cand:
        rows, cols = np.nonzero(masks[r])
        dets.append(Detection(int(classes[r]), float(scores[r]), tuple(float(v) for v in boxes[r]),
                              (float(cols.mean()), float(rows.mean()))))
    la = assign_levels(dets, pixel_spacing_mm=sp, image_shape=(H, W), fov_rows=fov_rows(sagittal),
                       rule=m.UNANCHORED_LEVEL_RULE)
    for k, reason in la.rejected.items():
        r = cand[k]
        result.rejected.append({"box_xyxy": boxes[r].tolist(), "score": float(scores[r]),
                                "category_id": int(classes[r]), "reason": reason})
    for f in la.study_flags:
        if f not in result.qc_flags:
            result.qc_flags.append(f)

    for k in la.order:
        r = cand[k]
        info = pre[r]
        cx, cy = dets[k].centroid
        v = VertebraResult(level=la.levels[k], category_id=int(classes[r]), score=float(scores[r]),
                           box_xyxy=[float(x) for x in boxes[r]], mask=masks[r],
                           centroid_px=[cx, cy], centroid_lps=(transform @ [cx, cy, 0.0, 1.0])[:3].tolist())
        v.qc_flags = list(la.flags[k]) + info["flags"]
        v.trabecular_hu, v.trabecular_hu_sd, v.roi_pixels = info["hu"], info["sd"], int(info["n"])
        if use_core and info["hu"] is not None:
            pts = core_points_lps(transform, info["roi"], float(m.CORE_HALF_WIDTH_MM))
            v.trabecular_hu_3d, v.roi_voxels_3d = core_hu_3d(volume.data, volume.affine, pts)
        if v.trabecular_hu_3d is None:
            v.qc_flags.append("no_3d_core")
        withhold = any(f in v.qc_flags for f in WITHHOLDING_FLAGS)
        v.learned_bmd = _float(bmd[r]) if bmd is not None else None
        if not withhold:
            v.classical_bmd = _float(calibration.hu_to_bmd(v.trabecular_hu))
            v.classical_bmd_3d = _float(calibration.hu_to_bmd(v.trabecular_hu_3d))
        if v.learned_bmd is not None and v.classical_bmd is not None:
            v.bmd_difference = v.learned_bmd - v.classical_bmd
            if abs(v.bmd_difference) > float(m.MAX_BMD_DIFFERENCE):
                v.qc_flags.append("large_learned_classical_difference")
        if not withhold:
            v.bmd = v.learned_bmd if m.PRIMARY_BMD == "learned" else v.classical_bmd
        if v.category_id == VERTEBRAL_BODY_CLASS:
            v.category = acr_category(v.bmd)
            v.heights_mm = vertebral_heights(masks[r], sp)
        result.vertebrae.append(v)
    _grade_heights(result.vertebrae, [float(t) for t in m.HEIGHT_LOSS_GRADES], fov_rows(sagittal))
    for f in ("metal", "very_dense", "vertebral_height_loss", "low_confidence"):
        if any(f in v.qc_flags for v in result.vertebrae):
            _add(result.qc_flags, f)
    if volume is not None:
        result.qc["contrast"] = contrast_check(volume, result.vertebrae, transform, float(m.CONTRAST_HU))
        if result.qc["contrast"]["enhanced"]:
            _add(result.qc_flags, "contrast_enhanced")
    result.patient = patient_values(result.vertebrae, result.qc_flags, m.PRIMARY_BMD)
    return result


def _grade_heights(vertebrae: Sequence[VertebraResult], thresholds: Sequence[float], fov: Optional[tuple] = None):
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


def patient_values(vertebrae: Sequence[VertebraResult], study_flags: List[str], primary: str = "learned"
                   ) -> Dict[str, Any]:
    """Patient-level values: ACR QCT mean of two lumbar vertebrae and the L1 HU screening category.

    ACR rule: the mean of L1 and L2; when one of them is missing or unusable (flags in ``ACR_EXCLUDING_FLAGS``, no
    value), the first two usable of L1–L4 (study flag ``acr_levels_substituted``); fewer than two usable:
    ``acr_not_available``. ``study_flags`` is extended in place.
    """
    by_level = {v.level: v for v in vertebrae if v.level}

    def usable(v: Optional[VertebraResult], attr: str) -> bool:
        return v is not None and getattr(v, attr) is not None and not any(f in v.qc_flags
                                                                           for f in ACR_EXCLUDING_FLAGS)

    out: Dict[str, Any] = {"primary_bmd": primary}
    for suffix, attr in (("", "bmd"), ("_learned", "learned_bmd"), ("_classical", "classical_bmd")):
        levels = [lv for lv in ACR_CANDIDATES if usable(by_level.get(lv), attr)][:2]
        if all(usable(by_level.get(lv), attr) for lv in ACR_PREFERRED):
            levels = list(ACR_PREFERRED)
        value = float(np.mean([getattr(by_level[lv], attr) for lv in levels])) if len(levels) == 2 else None
        out[f"acr_levels{suffix}"] = levels if value is not None else []
        out[f"acr_bmd{suffix}"] = value
        out[f"acr_category{suffix}"] = acr_category(value)
        if suffix == "":
            if value is None:
                _add(study_flags, "acr_not_available")
            elif levels != list(ACR_PREFERRED):
                _add(study_flags, "acr_levels_substituted")
    l1 = by_level.get("L1")
    out["l1_hu"] = l1.trabecular_hu if l1 is not None and "implausible_hu" not in l1.qc_flags else None
    out["hu_category"] = hu_category(out["l1_hu"])
    return out


def sagittal_from_cfg(volume, cfg):
    """``make_sagittal`` with the ``INPUT.DICOM`` settings (spacing, size, slices, window) used in training."""
    from bmd_d2.data.datasets import params_from_cfg
    from bmd_d2.data.sagittal import make_sagittal

    return make_sagittal(volume, **params_from_cfg(cfg))


def fov_rows(sagittal) -> Optional[tuple]:
    """``(first, last)`` image rows holding scanned anatomy (not padding), from ``info["pad_px"]``; None if unknown."""
    info = getattr(sagittal, "info", None) or {}
    pad = info.get("pad_px") if isinstance(info, dict) else None
    if not pad:
        return None
    H = np.asarray(sagittal.hu).shape[1]
    return int(pad.get("top", 0)), int(H - 1 - pad.get("bottom", 0))


def _add(flags: List[str], flag: str):
    if flag not in flags:
        flags.append(flag)


class BMDStudyPredictor:
    """Measure CT studies with a trained bmd_d2 model.

    Example::

        cfg = get_bmd_cfg("configs/bmd_rcnn_MFEFPN_R18_1x.yaml", ["MODEL.WEIGHTS", "model_final.pth"])
        predictor = BMDStudyPredictor(cfg)
        result = predictor("path/to/dicom_folder")      # or a .nii.gz path, a list of files, or a Volume
        print(result.patient["acr_bmd"], [v.level for v in result.vertebrae])

    Args:
        cfg: a config built with ``add_bmd_config`` (``MODEL.WEIGHTS`` = trained weights; "" = random init).
    """

    def __init__(self, cfg):
        from detectron2.engine import DefaultPredictor

        import bmd_d2  # noqa: F401  (registers the model components)

        from bmd_d2.checkpoint import BMDCheckpointer, check_weights_config

        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.unchecked = check_weights_config(self.cfg)  # BMDError if the weights' stored config differs
        # DefaultPredictor would load the weights with Detectron2's loader (pickle for .pkl); build it without
        # weights and load them weights-only.
        bare = self.cfg.clone()
        bare.defrost()
        bare.MODEL.WEIGHTS = ""
        self.predictor = DefaultPredictor(bare)
        self.predictor.cfg = self.cfg
        if self.cfg.MODEL.WEIGHTS:
            BMDCheckpointer(self.predictor.model).load(self.cfg.MODEL.WEIGHTS)
        # DefaultPredictor resizes with ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST), as BMDDatasetMapper does
        # at test time: the model sees exactly what evaluation feeds (tests/test_measure_cli.py checks it).
        self.model = self.predictor.model

    def load(self, source) -> Any:
        """Load a study (DICOM folder/file/list, NIfTI path, or a ``Volume``) as a ``Volume``.

        HU are kept as int16 where that is exact (integer rescale, the usual CT case: half the memory, no float
        conversion); the sagittal sampling and the measurements interpolate them into float32.
        """
        from bmd_d2.data.dicom import Volume, load_volume

        if isinstance(source, Volume):
            return source
        return load_volume(source, series_uid=self.cfg.INPUT.DICOM.SERIES_UID or None, dtype="auto")

    def sagittal(self, volume):
        """The 3-slice sagittal ``SagittalImage`` of a volume, built exactly as for training."""
        return sagittal_from_cfg(volume, self.cfg)

    def model_image(self, sagittal) -> np.ndarray:
        """The ``(H, W, 3)`` array handed to ``DefaultPredictor`` so the model sees what the training mapper feeds.

        ``DefaultPredictor`` takes BGR and reverses the channels when ``INPUT.FORMAT`` is "RGB"; the mapper reads the
        sagittal PNG (channels = slices 0, 1, 2 as R, G, B) with ``INPUT.FORMAT``. Both cases give the slices
        reversed here. Both then resize to MIN_SIZE_TEST the same way; a test checks the tensors are equal.
        """
        return np.ascontiguousarray(sagittal.image[:, :, ::-1])

    def detect(self, sagittal) -> Dict[str, Optional[np.ndarray]]:
        """Run the model on a sagittal image; arrays as in :func:`instances_to_arrays` at the image's size."""
        out = self.predictor(self.model_image(sagittal))
        return instances_to_arrays(out["instances"])

    def __call__(self, source: Union[str, os.PathLike, Sequence[str], Any], study_id: Optional[str] = None
                 ) -> StudyResult:
        """Measure one study.

        Args:
            source: DICOM folder/file/list, NIfTI path, or ``Volume``.
            study_id: id stored in the result (default: derived from the source path).

        Raises:
            BMDError: unreadable input or no spine-like image can be made of it.
        """
        from .batch import study_id_from_path

        volume = self.load(source)
        sid = study_id or study_id_from_path(volume.meta.get("source") or "study")
        sag = self.sagittal(volume)
        dets = self.detect(sag)
        result = measure_detections(dets, sag, self.cfg, volume=volume, study_id=sid)
        result.model.update({"weights": os.path.basename(self.cfg.MODEL.WEIGHTS) if self.cfg.MODEL.WEIGHTS
                             else "(random init)", "meta_architecture": self.cfg.MODEL.META_ARCHITECTURE})
        return result
