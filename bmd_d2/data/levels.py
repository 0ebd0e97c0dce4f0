"""Vertebral levels, label values and Detectron2 class names: the one home of the level map.

Every label volume in the project (phantom ``labels.nii.gz``/``cores.nii.gz``, user label volumes after mapping) uses
``label value = LEVELS.index(level) + 1``: T11 = 1, T12 = 2, L1 = 3, L2 = 4, L3 = 5, L4 = 6, L5 = 7, S1 = 8, and 0 for
background. Levels run cranial → caudal, so a larger label value lies lower (more inferior) in the patient.

Detectron2 thing classes: 0 = ``vertebral_body`` (T11…L5), 1 = ``sacrum`` (S1, the anchor for level counting).
"""
from typing import Dict, Tuple

LEVELS: Tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
LEVEL_TO_LABEL: Dict[str, int] = {name: i + 1 for i, name in enumerate(LEVELS)}
LABEL_TO_LEVEL: Dict[int, str] = {i + 1: name for i, name in enumerate(LEVELS)}

THING_CLASSES: Tuple[str, ...] = ("vertebral_body", "sacrum")
VERTEBRAL_BODY_CLASS = 0
SACRUM_CLASS = 1


def level_label(level: str) -> int:
    """Label value (1…8) of a level name such as ``"L3"``; raises ``KeyError`` for unknown names."""
    return LEVEL_TO_LABEL[level.upper()]


def level_name(label: int) -> str:
    """Level name of a label value (1…8); raises ``KeyError`` for 0 or unknown values."""
    return LABEL_TO_LEVEL[int(label)]


def level_class(level: str) -> int:
    """Detectron2 category id of a level: ``SACRUM_CLASS`` for S1, ``VERTEBRAL_BODY_CLASS`` otherwise."""
    return SACRUM_CLASS if level.upper() == "S1" else VERTEBRAL_BODY_CLASS
