"""Measuring studies: level labels, classical and learned BMD, categories, reports, batch runs.

Public API::

    from bmd_d2.measure import BMDStudyPredictor, StudyResult
    result = BMDStudyPredictor(cfg)("path/to/study")

Submodules import Detectron2 only where they need the model (``predictor``, ``batch``, ``cli``).
"""
from .categories import acr_category, hu_category
from .classical import Calibration, load_calibration_file
from .levels import Detection, LevelAssignment, assign_levels
from .predictor import BMDStudyPredictor, measure_detections
from .result import QC_FLAGS, StudyResult, VertebraResult

__all__ = [
    "BMDStudyPredictor", "StudyResult", "VertebraResult", "QC_FLAGS", "measure_detections", "assign_levels",
    "Detection", "LevelAssignment", "Calibration", "load_calibration_file", "acr_category", "hu_category",
]
