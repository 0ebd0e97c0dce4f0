"""Patient-level values of one study: the ACR QCT value of two lumbar vertebrae and the L1 HU screening category."""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bmd_d2.levels import add_flag

from .categories import ACR_PREFERRED, acr_category, acr_levels, hu_category
from .result import VertebraResult

__all__ = ["ACR_EXCLUDING_FLAGS", "patient_values"]

# Vertebra flags that make a vertebra unusable for the patient-level ACR value.
ACR_EXCLUDING_FLAGS = ("implausible_hu", "truncated_by_image_edge", "roi_too_small", "metal", "very_dense",
                       "vertebral_height_loss")


def _usable(v: Optional[VertebraResult], attr: str) -> bool:
    return v is not None and getattr(v, attr) is not None and not any(f in v.qc_flags for f in ACR_EXCLUDING_FLAGS)


def patient_values(vertebrae: Sequence[VertebraResult], study_flags: List[str], primary: str = "learned"
                   ) -> Dict[str, Any]:
    """Patient-level values: ACR QCT mean of two lumbar vertebrae and the L1 HU screening category.

    ACR rule (:func:`~bmd_d2.measure.categories.acr_levels`): the mean of L1 and L2; when one of them is missing or
    unusable (flags in ``ACR_EXCLUDING_FLAGS``, no value), the first two usable of L1–L4 (study flag
    ``acr_levels_substituted``); fewer than two usable: ``acr_not_available``. ``study_flags`` is extended in place.
    """
    by_level = {v.level: v for v in vertebrae if v.level}
    out: Dict[str, Any] = {"primary_bmd": primary}
    for suffix, attr in (("", "bmd"), ("_learned", "learned_bmd"), ("_classical", "classical_bmd")):
        levels = acr_levels([lv for lv, v in by_level.items() if _usable(v, attr)])
        value = float(np.mean([getattr(by_level[lv], attr) for lv in levels])) if levels else None
        out[f"acr_levels{suffix}"] = levels
        out[f"acr_bmd{suffix}"] = value
        out[f"acr_category{suffix}"] = acr_category(value)
        if suffix == "":
            if value is None:
                add_flag(study_flags, "acr_not_available")
            elif levels != list(ACR_PREFERRED):
                add_flag(study_flags, "acr_levels_substituted")
    l1 = by_level.get("L1")
    out["l1_hu"] = l1.trabecular_hu if l1 is not None and "implausible_hu" not in l1.qc_flags else None
    out["hu_category"] = hu_category(out["l1_hu"])
    return out
