"""Diagnostic categories from volumetric BMD (ACR QCT) and from trabecular HU (opportunistic CT screening).

Sources:
    * ACR–SPR–SSR Practice Parameter for the Performance of Musculoskeletal Quantitative Computed Tomography (QCT),
      American College of Radiology (Resolution 7, revised 2018; amended 2023). Spinal trabecular volumetric BMD,
      averaged over two lumbar vertebral bodies (normally L1 and L2), is classified as
      > 120 mg/cm³ normal, 80–120 mg/cm³ osteopenia (low bone mass), < 80 mg/cm³ osteoporosis.
      The WHO T-score definitions do not apply to QCT; these absolute thresholds replace them.
    * Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley N. Opportunistic screening for osteoporosis
      using abdominal computed tomography scans obtained for other indications. Ann Intern Med 2013;158(8):588–595.
      Unenhanced/enhanced L1 trabecular attenuation against DXA: an L1 threshold of ≤ 160 HU was ~90 % sensitive and
      ≤ 110 HU > 90 % specific for osteoporosis. These are screening thresholds, not a diagnosis.

Patient value (:func:`acr_levels`): the mean of L1 and L2; when one of them is not usable, the first two usable of
L1–L4; fewer than two usable: no patient value. The measurement (:func:`bmd_d2.measure.patient.patient_values`) and
the phantom truth (:func:`bmd_d2.evaluation.study_accuracy.truth_acr`) both choose their levels by this one rule.

Boundary convention (tested): exactly 120 and exactly 80 mg/cm³ are osteopenia; exactly 160 HU is "indeterminate",
exactly 110 HU is "osteoporosis_likely".
"""
import math
from typing import Collection, List, Optional

ACR_NORMAL_ABOVE = 120.0  # mg/cm³: BMD > this is normal
ACR_OSTEOPOROSIS_BELOW = 80.0  # mg/cm³: BMD < this is osteoporosis
HU_SENSITIVE_THRESHOLD = 160.0  # HU at L1: <= this flags possible osteoporosis (~90 % sensitive)
HU_SPECIFIC_THRESHOLD = 110.0  # HU at L1: <= this makes osteoporosis likely (> 90 % specific)

ACR_PREFERRED = ("L1", "L2")  # the ACR patient value's levels when both are usable
ACR_CANDIDATES = ("L1", "L2", "L3", "L4")  # the lumbar levels that may stand in for them, in order

ACR_CATEGORIES = ("normal", "osteopenia", "osteoporosis")
HU_CATEGORIES = ("normal_likely", "indeterminate", "osteoporosis_likely")


def _valid(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def acr_levels(usable: Collection[str]) -> List[str]:
    """The two levels the ACR patient value averages: L1 and L2 when both are ``usable``, else the first two usable of
    L1–L4; ``[]`` when fewer than two are usable.

    Args:
        usable: the level names with a usable value.
    """
    if all(lv in usable for lv in ACR_PREFERRED):
        return list(ACR_PREFERRED)
    levels = [lv for lv in ACR_CANDIDATES if lv in usable][:2]
    return levels if len(levels) == 2 else []


def acr_category(bmd_mg_cm3: Optional[float]) -> Optional[str]:
    """ACR QCT category of a volumetric trabecular BMD.

    Args:
        bmd_mg_cm3: BMD in mg/cm³ (normally the mean of two lumbar vertebrae); None/NaN gives None.

    Returns:
        "normal" (> 120), "osteopenia" (80–120 inclusive), "osteoporosis" (< 80), or None.
    """
    if not _valid(bmd_mg_cm3):
        return None
    if bmd_mg_cm3 > ACR_NORMAL_ABOVE:
        return "normal"
    if bmd_mg_cm3 < ACR_OSTEOPOROSIS_BELOW:
        return "osteoporosis"
    return "osteopenia"


def hu_category(l1_hu: Optional[float]) -> Optional[str]:
    """Opportunistic-screening category of the L1 trabecular attenuation (Pickhardt et al. 2013).

    Args:
        l1_hu: mean trabecular HU of L1; None/NaN gives None.

    Returns:
        "normal_likely" (> 160 HU), "indeterminate" (110 < HU <= 160), "osteoporosis_likely" (<= 110 HU), or None.
    """
    if not _valid(l1_hu):
        return None
    if l1_hu <= HU_SPECIFIC_THRESHOLD:
        return "osteoporosis_likely"
    if l1_hu <= HU_SENSITIVE_THRESHOLD:
        return "indeterminate"
    return "normal_likely"
