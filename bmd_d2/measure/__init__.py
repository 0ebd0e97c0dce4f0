"""Measuring studies: the study predictor, per-vertebra measurement, classical and learned BMD, QC, categories.

Public API::

    from bmd_d2.measure import BMDStudyPredictor, StudyResult
    result = BMDStudyPredictor(cfg)("path/to/study")

Submodules import Detectron2 only where they need the model (``predictor``); the measurement after the model
(``vertebrae``, ``patient``, ``classical``, ``qc``, ``categories``) works on NumPy arrays.
"""
from bmd_d2.levels import Detection, LevelAssignment, assign_levels

from .categories import acr_category, hu_category
from .classical import Calibration, load_calibration_file
from .predictor import BMDStudyPredictor
from .result import QC_FLAGS, StudyResult, VertebraResult
from .vertebrae import measure_detections

__all__ = [
    "BMDStudyPredictor", "StudyResult", "VertebraResult", "QC_FLAGS", "measure_detections", "assign_levels",
    "Detection", "LevelAssignment", "Calibration", "load_calibration_file", "acr_category", "hu_category",
]
