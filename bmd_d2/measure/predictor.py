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
from .classical import (Calibration, Core3D, calibration_from_cfg, core_min_rows_erosion_mm, core_volume_reason,
                        erode_mask, measure_core_3d, sagittal_roi_hu, slice_thickness_mm, vertebral_heights)
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


def parse_tta_shifts(value) -> List[tuple]:
    """``MEASURE.TTA_SHIFTS`` → list of ``(dy, dx)`` int pairs; ``BMDError`` naming the key for anything else.

    ``(0, 0)`` is dropped (the unshifted pass always runs); shifts are limited to ±8 pixels.
    """
    shifts = []
    for item in value or []:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 8 for v in item)
        if not ok:
            raise BMDError(f"MEASURE.TTA_SHIFTS must be a list of [dy, dx] integer pixel pairs within ±8, "
                           f"got {list(value)!r}")
        if tuple(item) != (0, 0) and tuple(item) not in shifts:
            shifts.append(tuple(int(v) for v in item))
    return shifts


def parse_tta_sizes(value, base: int) -> List[int]:
    """``MEASURE.TTA_SIZES`` → list of shortest-edge sizes other than ``base`` (``INPUT.MIN_SIZE_TEST``);
    ``BMDError`` naming the key for anything but integers in 32…4096."""
    sizes = []
    for item in value or []:
        if not (isinstance(item, int) and not isinstance(item, bool) and 32 <= item <= 4096):
            raise BMDError(f"MEASURE.TTA_SIZES must be a list of integer image sizes (shortest edge, 32-4096 px), "
                           f"got {list(value)!r}")
        if item != base and item not in sizes:
            sizes.append(int(item))
    return sizes


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved by ``dy`` rows and ``dx`` columns (content leaving the frame is dropped, zeros enter)."""
    out = np.zeros_like(image)
    H, W = image.shape[:2]
    if abs(dy) >= H or abs(dx) >= W:
        return out
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        image[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def unshift_pass(dets: Dict[str, Optional[np.ndarray]], dy: int, dx: int) -> Dict[str, Optional[np.ndarray]]:
    """Map the detections of an image shifted by ``(dy, dx)`` back to the unshifted image."""
    out = dict(dets)
    out["boxes"] = dets["boxes"] - np.array([dx, dy, dx, dy], np.float64)
    if dets.get("masks") is not None:
        m = dets["masks"]
        out["masks"] = np.stack([shift_image(x, -dy, -dx) for x in m]) if len(m) else m
    return out


def paste_soft_masks(masks, boxes, height: int, width: int) -> np.ndarray:
    """Paste ``(R, M, M)`` mask probabilities into ``(R, height, width)`` float32 at XYXY ``boxes`` ``(R, 4)``.

    The geometry of Detectron2's mask pasting: pixel centres mapped into the box and sampled bilinearly from the
    mask grid (``grid_sample``, ``align_corners=False``, zeros outside), within the box's pixel range plus one pixel.
    Thresholded at 0.5 it gives ``detector_postprocess``'s masks; here the probabilities are kept for averaging.
    """
    import torch
    import torch.nn.functional as F

    R = int(masks.shape[0])
    out = np.zeros((R, height, width), np.float32)
    for i in range(R):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        c0, r0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        c1, r1 = min(int(math.ceil(x1)) + 1, width), min(int(math.ceil(y1)) + 1, height)
        if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
            continue
        gx = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        gy = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], dim=2)
        pasted = F.grid_sample(masks[i][None, None].float(), grid[None], mode="bilinear", align_corners=False)
        out[i, r0:r1, c0:c1] = pasted[0, 0].numpy()
    return out


def merge_tta_passes(passes: Sequence[Dict[str, Optional[np.ndarray]]], min_iou: float = 0.5
                     ) -> Dict[str, Optional[np.ndarray]]:
    """Merge test-time passes (shifted or resized; soft masks, all in the reference image's frame) into one set.

    The first pass is the reference: its detections are the ones reported (no pass adds or removes a vertebra).
    Every other pass is matched to it one to one by box IoU ≥ ``min_iou`` between detections of the same class
    (Detectron2's ``pairwise_iou``, the evaluation's :func:`~bmd_d2.evaluation.metrics.match_greedy`: highest IoU
    first). Per reference detection: the mask is the mean probability of the matched passes thresholded at 0.5, box
    and learned BMD are the matched passes' means, and the score is the mean over *all* passes (a pass that missed
    it counts 0, so an unstable detection loses confidence). A pass whose ``bmd`` is None (e.g. one at another input
    size) contributes to everything but the learned BMD.

    Returns:
        as :func:`instances_to_arrays` (``masks`` bool).
    """
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    from bmd_d2.evaluation.metrics import match_greedy

    ref = passes[0]
    R = len(ref["scores"])
    n_match = np.ones(R)
    n_bmd = np.ones(R)
    boxes = ref["boxes"].copy()
    score_sum = ref["scores"].copy()
    has_masks = ref.get("masks") is not None
    mask_sum = ref["masks"].astype(np.float32) if has_masks else None
    has_bmd = ref.get("bmd") is not None
    bmd_sum = ref["bmd"].copy() if has_bmd else None
    for other in passes[1:]:
        if not len(other["scores"]) or not R:
            continue
        iou = pairwise_iou(Boxes(torch.as_tensor(ref["boxes"])), Boxes(torch.as_tensor(other["boxes"]))).numpy()
        iou[ref["classes"][:, None] != other["classes"][None, :]] = 0.0
        for i, j in match_greedy(iou, min_iou):
            n_match[i] += 1
            boxes[i] += other["boxes"][j]
            score_sum[i] += other["scores"][j]
            if has_masks and other.get("masks") is not None:
                mask_sum[i] += other["masks"][j]
            if has_bmd and other.get("bmd") is not None:
                bmd_sum[i] += other["bmd"][j]
                n_bmd[i] += 1
    return {
        "boxes": boxes / n_match[:, None],
        "scores": score_sum / len(passes),
        "classes": ref["classes"].copy(),
        "masks": (mask_sum / n_match[:, None, None] >= 0.5) if has_masks else None,
        "bmd": bmd_sum / n_bmd if has_bmd else None,
    }


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
    core_reason, core_detail = core_volume_reason(volume, float(m.CORE_MAX_SPACING_MM))
    core_rows_px = 0.0 if core_reason else core_min_rows_erosion_mm(volume, float(m.CORE_MIN_EROSION_SLICES)) / sp

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
        if core_reason is None and info["hu"] is not None:
            # the sagittal ROI, unless the slice spacing asks for a deeper one (spacing 5 mm; up to 4 mm it never does)
            roi = info["roi"] if core_rows_px <= radius_rows_px else erode_mask(masks[r], radius_px, core_rows_px)
            core = measure_core_3d(volume, transform, roi, float(m.CORE_HALF_WIDTH_MM), int(m.MIN_ROI_PIXELS))
        elif core_reason is None:
            core = Core3D(reason="no_roi", detail="the sagittal ROI is too small (roi_too_small)")
        else:
            core = Core3D(reason=core_reason, detail=core_detail)
        v.trabecular_hu_3d, v.roi_voxels_3d = core.hu, core.n
        v.core_3d_reason, v.core_3d_detail = core.reason, core.detail
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
        self.tta_shifts = parse_tta_shifts(self.cfg.MEASURE.TTA_SHIFTS)
        self.tta_sizes = parse_tta_sizes(self.cfg.MEASURE.TTA_SIZES, int(self.cfg.INPUT.MIN_SIZE_TEST))

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
        """Run the model on a sagittal image; arrays as in :func:`instances_to_arrays` at the image's size.

        With ``MEASURE.TTA_SHIFTS`` the image is also run shifted by each ``(dy, dx)`` (pixels, zero fill) and the
        passes are merged by :func:`merge_tta_passes`: the model sees the image at 1/2 of its resolution
        (256² for the default), so a one-pixel shift samples the other phase of its grid, and the averaged mask no
        longer jumps with the sub-pixel position of the anatomy. With ``MEASURE.TTA_SIZES`` it is also run once per
        size with the model input resized to it (unshifted), merged the same way except for the learned BMD, which
        stays the mean of the passes at the training size.
        """
        image = self.model_image(sagittal)
        if not self.tta_shifts and not self.tta_sizes:
            return instances_to_arrays(self.predictor(image)["instances"])
        passes = [self._soft_pass(image)]
        for dy, dx in self.tta_shifts:
            passes.append(unshift_pass(self._soft_pass(shift_image(image, dy, dx)), dy, dx))
        for size in self.tta_sizes:
            passes.append(dict(self._soft_pass(image, size), bmd=None))
        return merge_tta_passes(passes)

    def _soft_pass(self, image: np.ndarray, size: Optional[int] = None) -> Dict[str, Optional[np.ndarray]]:
        """One forward pass as ``DefaultPredictor`` runs it, keeping the mask probabilities.

        Args:
            image: as :meth:`model_image` returns it.
            size: shortest edge of the model input instead of ``INPUT.MIN_SIZE_TEST`` (the longest-edge limit
                ``INPUT.MAX_SIZE_TEST`` scales by the same factor); None = ``DefaultPredictor``'s own resize.

        Returns:
            as :func:`instances_to_arrays`, but ``masks`` are float32 ``(R, H, W)`` probabilities pasted into the
            image (:func:`paste_soft_masks`) instead of the thresholded masks.
        """
        import torch

        p = self.predictor
        original = image[:, :, ::-1] if p.input_format == "RGB" else image
        H, W = original.shape[:2]
        aug = p.aug
        if size is not None:
            from detectron2.data import transforms as T

            base = int(self.cfg.INPUT.MIN_SIZE_TEST) or min(H, W)  # 0 = no resize: the reference pass sees H × W
            aug = T.ResizeShortestEdge([size, size], int(round(self.cfg.INPUT.MAX_SIZE_TEST * size / base)))
        x = aug.get_transform(original).apply_image(original)
        x = torch.as_tensor(np.ascontiguousarray(x).astype("float32").transpose(2, 0, 1)).to(self.cfg.MODEL.DEVICE)
        with torch.no_grad():
            inst = self.model.inference([{"image": x, "height": H, "width": W}], do_postprocess=False)[0]
        # detector_postprocess's geometry: boxes to the image's size, clipped, empty boxes dropped
        h, w = inst.image_size
        boxes = inst.pred_boxes.clone()
        boxes.scale(W / w, H / h)
        boxes.clip((H, W))
        keep = boxes.nonempty()
        inst, boxes = inst[keep], boxes[keep]
        inst = inst.to("cpu")
        masks = None
        if inst.has("pred_masks"):
            masks = paste_soft_masks(inst.pred_masks[:, 0].float(), boxes.tensor.cpu(), H, W)
        return {
            "boxes": boxes.tensor.cpu().numpy().astype(np.float64),
            "scores": inst.scores.numpy().astype(np.float64),
            "classes": inst.pred_classes.numpy().astype(np.int64),
            "masks": masks,
            "bmd": inst.pred_bmd.numpy().astype(np.float64).reshape(-1) if inst.has("pred_bmd") else None,
        }

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
                             else "(random init)", "meta_architecture": self.cfg.MODEL.META_ARCHITECTURE,
                             "tta_shifts": [list(t) for t in self.tta_shifts], "tta_sizes": list(self.tta_sizes)})
        return result
