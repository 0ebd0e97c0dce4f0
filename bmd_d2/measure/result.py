"""The study result contract (docs/ARCHITECTURE.md): what measuring one CT study returns.

``StudyResult.to_dict()`` is JSON-serialisable and holds no patient name/ID: only UIDs and technical tags.
Masks, the sagittal image and the volume stay in memory (not serialised); reports write them separately.

QC flags are short lower_snake strings; :data:`QC_FLAGS` is their one registry (name → meaning). Code that adds a
flag registers it there so reports and docs can explain it.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from bmd_d2.utils.files import json_ready

RESULT_VERSION = 1

QC_FLAGS: Dict[str, str] = {
    # level labelling (bmd_d2.levels)
    "levels_unanchored": "neither the sacrum (detected or found in 3-D) nor the last rib anchors the count: levels "
                         "by the fallback rule (lowest body = L5)",
    "levels_unknown": "no anchor and the field of view ends in the lumbar spine: no level named",
    "level_count_conflict": "counting from the sacrum (detected or its sacroiliac joints in 3-D) and from the last "
                            "rib (= T12) disagree (11/13 ribs, a transitional vertebra, or a wrong anchor): levels "
                            "from the sacrum, every labeling in levels.level_labelings",
    "sacrum_3d_low_confidence": "sacroiliac joints found in 3-D but short or cut by the field of view: not counted "
                                "from",
    "sacrum_3d_above_bodies": "sacroiliac joints found in 3-D above every detected body: not counted from",
    "rib_anchor_untied": "ribs found in 3-D, but no detected body at the last rib's height: not counted from",
    "rib_body_above_detections": "the last rib's joints lie one level above the top detected body (cut by the field "
                                 "of view or undetected): counted from the level below it",
    "rib_anchor_low_confidence": "only one rib of one rib-bearing level found: the rib anchor is not counted from",
    "below_labelled_range": "counted below L5 from the last rib: no level name is given",
    "level_gap": "the spacing of the detected bodies shows an undetected vertebra; the count skips it",
    "level_after_gap": "this body's level was counted across a gap (an undetected vertebra below it)",
    "above_labelled_range": "counted above T11: no level name is given",
    "possible_transitional_anatomy": "lowest lumbar body is short or fused-looking, or lies below the top of the "
                                     "sacroiliac joints (sacralised): possible transitional vertebra",
    "multiple_sacrum_detections": "several sacrum detections; the most cranial plausible one anchors the count",
    "partial_coverage": "not all of L1-L4 are in view, or a body touches the image edge",
    "truncated_by_image_edge": "the body touches the edge of the sagittal image: it may be cut off",
    "no_vertebrae_detected": "no vertebral body above the score threshold",
    # classical measurement (bmd_d2.measure.classical)
    "roi_too_small": "the eroded trabecular ROI has too few pixels: no classical value",
    "no_3d_core": "no 3-D core value; core_3d_reason says why (slices_too_thick, outside_volume, no_roi, ...) and "
                  "core_3d_detail gives the figures",
    "implausible_hu": "trabecular HU outside the plausible range for bone: values withheld",
    "implausible_size": "mask area outside the plausible range for a vertebral body: not measured",
    "acr_levels_substituted": "the ACR patient value uses lumbar levels other than L1+L2",
    "acr_not_available": "fewer than two usable lumbar vertebrae: no ACR patient category",
    "internal_reference_failed": "air/fat internal reference not found: default calibration used",
    # calibration (bmd_d2.measure.classical, bmd_d2.measure.internal_calibration)
    "uncalibrated": "BMD through a line not fitted to this scan (the generic linear default MEASURE.CALIBRATION_SLOPE/"
                    "INTERCEPT, or the nominal line of its kVp), not a phantom or internal calibration: not QCT-grade",
    "calibration_fallback": "the internal calibration could not be trusted (calibration.details.fallback_reason): "
                            "the nominal line of the scan's kVp was used (the generic default without a usable kVp)",
    "calibration_contrast": "contrast in the aorta: blood left out of the internal calibration (iodine also raises "
                            "trabecular HU)",
    "calibration_metal": "metal (>= MEASURE.METAL_HU) in every slice within 10 mm of some vertebral levels: those "
                         "levels left out of the internal calibration",
    "large_learned_classical_difference": "learned and classical BMD differ by more than MEASURE.MAX_BMD_DIFFERENCE",
    "volume_warning": "the volume loader reported a warning (see study.warnings)",
    # reports (bmd_d2.reports.study)
    "output_not_written": "an optional output (DICOM SEG/SR/SC, masks) could not be written; the measurement stands "
                          "(see outputs.failed in result.json)",
    # DICOM outputs (bmd_d2.reports.dicom)
    "source_uids_generated": "the source images lack Study/Series/SOP Instance/Frame of Reference (or SOP Class) UIDs: "
                             "the DICOM outputs reference generated ones (study.generated_uids), not UIDs a PACS "
                             "knows",
    # robustness checks (bmd_d2.measure.qc)
    "slice_gaps": "missing slices or uneven slice spacing: the volume was resampled onto a uniform grid",
    "gantry_tilt": "gantry-tilted acquisition: sheared slice geometry (kept exactly; check the sagittal image)",
    "non_axial": "non-axial or oblique slices: geometry kept exactly, but the model was trained on axial scans",
    "duplicate_slices": "several images at the same slice position: duplicates were dropped",
    "spine_not_found": "no spine-like bone column found (e.g. no spine in view): no vertebra is measured",
    "contrast_enhanced": "contrast phase: vessels in front of the spine enhance (>= MEASURE.CONTRAST_HU); iodine "
                         "raises trabecular HU, so classical BMD reads high",
    "metal": "metal (>= MEASURE.METAL_HU) in or beside the vertebra: every BMD withheld (classical and learned)",
    "very_dense": "trabecular HU above MEASURE.DENSE_HU (sclerosis, compaction, cement): excluded from the ACR value",
    "vertebral_height_loss": "Genant grade >= 1 height reduction (see genant_grade, height_loss_pct): possible "
                             "fracture, excluded from the ACR value",
    "low_confidence": "detection score below MEASURE.LOW_CONFIDENCE_SCORE: check the mask on the overlay",
}


@dataclass
class VertebraResult:
    """One measured vertebral body (or the sacrum).

    Attributes:
        level: "T11" … "L5", "S1", or None when it cannot be named.
        category_id: detector class, 0 vertebral body, 1 sacrum.
        score: detection confidence.
        box_xyxy: ``(x0, y0, x1, y1)`` in sagittal pixels.
        mask: bool ``(H, W)`` sagittal mask (not serialised).
        centroid_px: ``(x, y)`` mask centre in sagittal pixels.
        centroid_lps: ``(x, y, z)`` mm, patient coordinates (DICOM LPS).
        learned_bmd: model estimate, mg/cm³ (for a model that learned the trabecular HU: ``learned_hu`` through the
            study's calibration).
        learned_hu: the model's trabecular HU estimate (models with ``MODEL.ROI_BMD_HEAD.TARGET "hu"``; with
            ``"hu_correction"`` the measured HU, ``trabecular_hu_3d`` or else ``trabecular_hu``, plus
            ``learned_hu_correction``), else None.
        learned_hu_correction: the model's correction of the measured core HU (TARGET ``"hu_correction"``), else
            None.
        trabecular_hu: mean HU in the eroded mask over the 3 sagittal slices.
        trabecular_hu_sd: SD of those HU values.
        trabecular_hu_3d: mean HU in the 3-D core, or None when the geometry does not allow it.
        classical_bmd: mg/cm³ from ``trabecular_hu`` through the calibration.
        classical_bmd_3d: mg/cm³ from ``trabecular_hu_3d``.
        classical_bmd_sd, classical_bmd_3d_sd: 1-SD uncertainty (mg/cm³) of those values from the calibration's
            uncertainty (internal calibration; None for a line without one).
        bmd_difference: ``learned_bmd - classical_bmd``, mg/cm³.
        bmd: the reported BMD (``MEASURE.PRIMARY_BMD``: learned or classical), mg/cm³.
        category: ACR QCT category of ``bmd`` for this vertebra alone (the diagnosis uses ``patient``).
        roi_pixels: pixels in the eroded sagittal ROI (summed over the 3 slices).
        roi_voxels_3d: samples in the 3-D core.
        roi_rim_trimmed, roi_rim_trimmed_3d: sagittal ROI pixels (3 slices together) and 3-D core samples a dense
            rim took out (``MEASURE.RIM_TRIM_MM``: cortex the mask took in; 0 when none).
        core_3d_reason: why ``trabecular_hu_3d`` is None (a key of ``bmd_d2.measure.classical.CORE_3D_REASONS``:
            ``slices_too_thick``, ``pixels_too_large``, ``outside_volume``, ``no_roi``, ``no_volume``); None when
            measured.
        core_3d_detail: one line with the figures behind ``core_3d_reason`` (or, when measured, the edge samples
            that took the edge voxel's value); "" when there is nothing to say.
        heights_mm: anterior/middle/posterior heights (mm).
        height_loss_pct: height reduction (%): the larger of the wedge/biconcave ratio (1 - min/max of the three
            heights) and the crush ratio against the neighbouring bodies (see ``bmd_d2.measure.qc``).
        genant_grade: Genant semi-quantitative grade 0–3 of ``height_loss_pct`` (thresholds 20/25/40 %).
        qc_flags: flags of this vertebra (see :data:`QC_FLAGS`).
    """

    level: Optional[str]
    category_id: int
    score: float
    box_xyxy: List[float]
    mask: Optional[np.ndarray] = None
    centroid_px: Optional[List[float]] = None
    centroid_lps: Optional[List[float]] = None
    learned_bmd: Optional[float] = None
    learned_hu: Optional[float] = None
    learned_hu_correction: Optional[float] = None
    trabecular_hu: Optional[float] = None
    trabecular_hu_sd: Optional[float] = None
    trabecular_hu_3d: Optional[float] = None
    classical_bmd: Optional[float] = None
    classical_bmd_3d: Optional[float] = None
    classical_bmd_sd: Optional[float] = None
    classical_bmd_3d_sd: Optional[float] = None
    bmd_difference: Optional[float] = None
    bmd: Optional[float] = None
    category: Optional[str] = None
    roi_pixels: int = 0
    roi_voxels_3d: int = 0
    roi_rim_trimmed: int = 0
    roi_rim_trimmed_3d: int = 0
    core_3d_reason: Optional[str] = None
    core_3d_detail: str = ""
    heights_mm: Dict[str, Optional[float]] = field(default_factory=dict)
    height_loss_pct: Optional[float] = None
    genant_grade: Optional[int] = None
    qc_flags: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "mask"}
        return json_ready(d)


@dataclass
class StudyResult:
    """Everything measured in one CT study.

    Attributes:
        study_id: the sanitised id used for output names.
        study: source identifiers (UIDs, Modality, KVP, Manufacturer, ``source``) and ``warnings`` from loading.
        vertebrae: :class:`VertebraResult` list, cranial → caudal.
        patient: patient-level values: ``acr_levels``, ``acr_bmd``, ``acr_category``, ``acr_bmd_classical``,
            ``acr_category_classical``, ``l1_hu``, ``hu_category``, ``primary_bmd``.
        qc_flags: study-level flags.
        calibration: the HU → BMD calibration used (``Calibration.to_dict()``: ``slope``, ``intercept``, ``source``,
            ``method`` (internal | file | default), ``slope_sd``, ``intercept_sd``, ``covariance``, ``flags``,
            ``details``: for the internal calibration its ROIs (voxels, HU), fitted spectrum and residuals).
        model: config file, weights path and score threshold.
        rejected: detections not reported, as ``{"box_xyxy", "score", "category_id", "reason"}``.
        qc: details of the study-level checks: ``plane_method`` (``"fallback"`` = no spine found), ``contrast``
            (see :func:`bmd_d2.measure.qc.contrast_check`).
        outputs: what the report writer did (set by :func:`bmd_d2.reports.study.write_study`): ``requested``
            (optional outputs asked for), ``written`` (file names), ``failed`` (output → one-line reason),
            ``skipped`` (output → reason it does not apply, e.g. DICOM outputs of a NIfTI input) and ``complete``
            (every requested output was attempted; false only while they are being written).
        levels: the level count (:func:`bmd_d2.measure.vertebrae.levels_record`): ``levels_anchor``,
            ``sacrum_source``, ``level_labelings``, ``rib_pairs_in_view``, ``convention``, ``rib_anchor``,
            ``sacrum_anchor``.
        sagittal: the ``SagittalImage`` measured (not serialised).
        volume: the ``Volume`` (not serialised).
    """

    study_id: str
    study: Dict[str, Any] = field(default_factory=dict)
    vertebrae: List[VertebraResult] = field(default_factory=list)
    patient: Dict[str, Any] = field(default_factory=dict)
    qc_flags: List[str] = field(default_factory=list)
    calibration: Dict[str, Any] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)
    rejected: List[Dict[str, Any]] = field(default_factory=list)
    qc: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Any] = field(default_factory=dict)
    levels: Dict[str, Any] = field(default_factory=dict)
    sagittal: Any = None
    volume: Any = None

    def vertebra(self, level: str) -> Optional[VertebraResult]:
        """The vertebra labelled ``level``, or None."""
        return next((v for v in self.vertebrae if v.level == level), None)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": RESULT_VERSION,
            "study_id": self.study_id,
            "study": json_ready(self.study),
            "vertebrae": [v.to_dict() for v in self.vertebrae],
            "patient": json_ready(self.patient),
            "qc_flags": list(self.qc_flags),
            "calibration": json_ready(self.calibration),
            "model": json_ready(self.model),
            "rejected": json_ready(self.rejected),
            "qc": json_ready(self.qc),
            "outputs": json_ready(self.outputs),
            "levels": json_ready(self.levels),
        }
