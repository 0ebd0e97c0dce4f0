"""Study-level accuracy of the measuring pipeline against phantom ground truth (``tools/benchmark_accuracy.py``).

Where :class:`~bmd_d2.evaluation.BMDEvaluator` scores the model on prepared sagittal datasets, this module scores what
a user gets: a :class:`~bmd_d2.measure.StudyResult` from :class:`~bmd_d2.measure.BMDStudyPredictor` (sanity checks,
level rule, classical BMD and patient categories included) against the truth of a generated phantom.

Matching, per study:

* Truth masks: the phantom's vertebral-body label volume sampled (nearest neighbour) at the result's sagittal
  mid-plane pixels, so predicted and true masks share one grid. A truth level counts when it is listed in the phantom's
  truth (at least half its height scanned) and its mid-plane mask has ``min_area_px`` pixels or more.
* By overlap (the primary pairing): reported vertebrae ↔ truth masks, one to one by mask IoU ≥ ``iou_threshold``
  (:func:`~bmd_d2.evaluation.metrics.match_greedy`). Pairs give Dice, level accuracy and BMD agreement per true level.
  A prediction overlapping a labelled but unlisted (mostly out of view) level is neither a hit nor a false positive.
* By label (what a reader of the report sees): the vertebra reported as level X ↔ the truth of level X.

BMD methods compared with the truth (mg/cm³): ``learned`` (the model, as reported), ``learned_true_cal`` (a model
that learned the trabecular HU: that HU through the phantom's own calibration), ``classical`` (sagittal ROI HU through
the configured calibration, as reported), ``classical_true_cal`` (the same HU through the phantom's own per-study
calibration ``HU = a + b·BMD``: a phantom-calibrated scanner), ``classical_3d`` and ``classical_3d_true_cal``
(3-D core).

The truth (:func:`reference_bmd`): the BMD a phantom QCT reads (``qct_bmd_mg_cm3``, generator v5: the K2HPO4-
equivalent density through K2HPO4-in-water rods imaged with the study's spectrum, the marrow-fat confounder included,
as in clinical QCT, on which the ACR thresholds are defined), or the drawn mineral density ``bmd_mg_cm3`` for older
generators (where the two are the same thing). Pairs also keep the mineral density (``gt_mineral``).
"""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bmd_d2.levels import LEVELS, SACRUM_CLASS, VERTEBRAL_BODY_CLASS, level_class
from bmd_d2.measure.categories import ACR_CATEGORIES, acr_category, acr_levels

from . import metrics

__all__ = [
    "METHODS", "reference_bmd", "truth_masks_on_sagittal", "truth_acr", "vertebra_values", "study_record",
    "summarize_studies", "rescan_groups", "summarize_precision", "precision_detail",
]

METHODS = ("learned", "learned_true_cal", "classical", "classical_true_cal", "classical_3d", "classical_3d_true_cal")
#: Methods with a patient-level ACR category: the report's own learned and classical categories, and the others' mean
#: at the two levels the classical rule chose (``acr_levels_classical``).
ACR_METHODS = ("learned", "classical", "learned_true_cal", "classical_true_cal", "classical_3d", "classical_3d_true_cal")


def reference_bmd(t: Dict) -> float:
    """The truth a measurement is compared with (module docstring): ``qct_bmd_mg_cm3`` where the phantom has it,
    else ``bmd_mg_cm3``."""
    q = t.get("qct_bmd_mg_cm3")
    return float(q if q is not None else t["bmd_mg_cm3"])


def truth_masks_on_sagittal(sagittal, labels, affine: np.ndarray, levels: Sequence[str], *, min_area_px: int = 30
                            ) -> "OrderedDict[str, np.ndarray]":
    """Truth vertebra masks on the sagittal mid-plane.

    Args:
        sagittal: the ``SagittalImage`` measured (``hu`` ``(C, H, W)``, ``transform``).
        labels: uint8 ``(K, J, I)`` label volume (T11 = 1 … S1 = 8), or a ``Volume`` holding it.
        affine: ``(4, 4)`` voxel → LPS of ``labels`` (ignored when ``labels`` is a ``Volume``).
        levels: the levels that count (the phantom's truth list).
        min_area_px: smaller mid-plane cross-sections are left out.

    Returns:
        level → bool ``(H, W)``, cranial → caudal.
    """
    from bmd_d2.data.dicom import Volume
    from bmd_d2.levels import LEVEL_TO_LABEL
    from bmd_d2.data.sagittal import sample_volume_to_sagittal

    vol = labels if isinstance(labels, Volume) else Volume(np.asarray(labels), np.asarray(affine, np.float64))
    lab = sample_volume_to_sagittal(sagittal, vol, order=0, cval=0)
    mid = lab[lab.shape[0] // 2]
    out = OrderedDict()
    for lv in LEVELS:
        if lv in levels:
            m = mid == LEVEL_TO_LABEL[lv]
            if int(m.sum()) >= min_area_px:
                out[lv] = m
    return out


def truth_acr(truth_bmd: Dict[str, float]) -> Dict[str, Any]:
    """Patient ACR value from true BMD by the measuring rule (:func:`~bmd_d2.measure.categories.acr_levels`): L1+L2,
    else the first two of L1–L4.

    Returns:
        ``{"levels", "bmd", "category"}``; ``bmd``/``category`` None with fewer than two levels.
    """
    levels = acr_levels(truth_bmd)
    if not levels:
        return {"levels": [], "bmd": None, "category": None}
    value = float(np.mean([truth_bmd[lv] for lv in levels]))
    return {"levels": levels, "bmd": value, "category": acr_category(value)}


def _true_cal(hu: Optional[float], slope: float, intercept: float) -> Optional[float]:
    return None if hu is None or not math.isfinite(hu) else (float(hu) - intercept) / slope


def vertebra_values(v, slope: float, intercept: float) -> Dict[str, Optional[float]]:
    """The BMD of one reported vertebra by every method in :data:`METHODS` (mg/cm³; None when not given)."""
    # The true calibration replaces only the conversion: where the measurement withheld its classical value (metal,
    # implausible HU, ...), so does this one.
    learned_hu = getattr(v, "learned_hu", None)
    return {
        "learned": v.learned_bmd,
        "learned_true_cal": None if v.learned_bmd is None else _true_cal(learned_hu, slope, intercept),
        "classical": v.classical_bmd,
        "classical_true_cal": None if v.classical_bmd is None else _true_cal(v.trabecular_hu, slope, intercept),
        "classical_3d": v.classical_bmd_3d,
        "classical_3d_true_cal": (None if v.classical_bmd_3d is None
                                  else _true_cal(v.trabecular_hu_3d, slope, intercept)),
    }


def study_record(result, truth: Sequence[Dict], gt_masks: Dict[str, np.ndarray], calib_a: float, calib_b: float, *,
                 iou_threshold: float = 0.5, ignore_masks: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Any]:
    """Match one study's result to its truth; a compact JSON-ready record (no masks).

    Args:
        result: the ``StudyResult`` (vertebrae with ``mask`` ``(H, W)``, ``level``, BMD values, ``qc_flags``).
        truth: the phantom's truth list (``level``, ``bmd_mg_cm3``, ...).
        gt_masks: level → bool ``(H, W)`` from :func:`truth_masks_on_sagittal` (the truth that counts).
        calib_a, calib_b: the phantom's calibration ``HU = a + b·BMD`` (intercept HU, slope HU per mg/cm³).
        iou_threshold: minimum mask IoU of a match.
        ignore_masks: masks of labelled levels that do not count (a prediction on them is not a false positive).

    Returns:
        ``{"study_id", "n_gt", "n_pred", "n_ignored", "pairs": [...], "by_label": [...], "patient": {...}}``; each pair
        holds ``pred_index`` (into ``result.vertebrae``), ``gt_level``, ``gt_class``, ``gt_bmd``, ``pred_level``,
        ``pred_class``, ``iou``, ``dice`` and ``pred`` = method → value.
    """
    truth_bmd = {t["level"]: reference_bmd(t) for t in truth}
    mineral = {t["level"]: float(t["bmd_mg_cm3"]) for t in truth}
    verts = list(result.vertebrae)
    gt_levels = list(gt_masks)
    H, W = (next(iter(gt_masks.values())).shape if gt_masks else
            (verts[0].mask.shape if verts else (0, 0)))
    pm = np.stack([np.asarray(v.mask, bool) for v in verts]) if verts else np.zeros((0, H, W), bool)
    gm = np.stack([gt_masks[lv] for lv in gt_levels]) if gt_levels else np.zeros((0, H, W), bool)
    iou = metrics.mask_iou_matrix(pm, gm)
    matches = metrics.match_greedy(iou, iou_threshold)
    values = [vertebra_values(v, calib_b, calib_a) for v in verts]
    pairs = []
    for i, j in matches:
        lv = gt_levels[j]
        pairs.append({"pred_index": int(i), "gt_level": lv, "gt_class": level_class(lv), "gt_bmd": truth_bmd.get(lv),
                      "gt_mineral": mineral.get(lv), "pred_level": verts[i].level, "pred_class": int(verts[i].category_id),
                      "iou": float(iou[i, j]), "dice": metrics.dice(pm[i], gm[j]), "pred": values[i]})
    matched = {i for i, _ in matches}
    ignored = 0
    if ignore_masks:
        im = np.stack(list(ignore_masks.values()))
        ov = metrics.mask_iou_matrix(pm, im)
        ignored = sum(1 for i in range(len(verts)) if i not in matched and ov.shape[1] and ov[i].max() >= iou_threshold)
    by_label = []
    for lv in gt_levels:
        v = next((k for k, x in enumerate(verts) if x.level == lv), None)
        by_label.append({"gt_level": lv, "gt_class": level_class(lv), "gt_bmd": truth_bmd.get(lv),
                         "pred": values[v] if v is not None else {m: None for m in METHODS}})
    p = result.patient or {}
    true_cal_levels = p.get("acr_levels_classical") or []

    def category_at_levels(method):  # the patient category of a method at the levels the classical rule chose
        vals = [values[k][method] for k, x in enumerate(verts) if x.level in true_cal_levels]
        return acr_category(float(np.mean(vals))) if len(vals) == 2 and None not in vals else None

    patient = {
        "truth": truth_acr(truth_bmd),
        "learned": p.get("acr_category_learned"),
        "classical": p.get("acr_category_classical"),
    }
    for m in ACR_METHODS[2:]:
        patient[m] = category_at_levels(m)
    return {"study_id": result.study_id, "n_gt": len(gt_levels), "n_pred": len(verts) - ignored, "n_ignored": ignored,
            "pairs": pairs, "by_label": by_label, "patient": patient}


def _summary(pairs: List[Dict], method: str) -> Dict[str, Any]:
    ps = [p for p in pairs if p["gt_bmd"] is not None and p["pred"].get(method) is not None]
    s = metrics.regression_summary([p["pred"][method] for p in ps], [p["gt_bmd"] for p in ps])
    s["n_missing"] = len(pairs) - len(ps)
    return s


def _nan_mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else math.nan


def summarize_studies(records: List[Dict]) -> Dict[str, Any]:
    """All accuracy figures from :func:`study_record` records (pure; ``nan`` where undefined).

    Returns:
        ``detection`` (gt, predictions, matched, recall, precision), ``dice`` (mean over matched pairs, vertebral
        bodies only, and counting missed truth as 0), ``levels`` (accuracy over matched pairs, fraction of studies with
        every match labelled right, confusion), ``bmd`` (method → ``vertebrae`` (T11–L5), ``all`` (incl. S1) and
        ``per_level`` regression summaries, pairs by overlap), ``bmd_by_label`` (method → vertebral-body summary of
        the by-label pairing), ``acr`` (method → patient-level accuracy, n, confusion).
    """
    pairs = [p for r in records for p in r["pairs"]]
    n_gt = sum(r["n_gt"] for r in records)
    n_pred = sum(r["n_pred"] for r in records)
    vb = [p for p in pairs if p["gt_class"] == VERTEBRAL_BODY_CLASS]
    out: Dict[str, Any] = OrderedDict()
    out["studies"] = len(records)
    out["detection"] = {"gt": n_gt, "predictions": n_pred, "matched": len(pairs),
                        "ignored_predictions": sum(r["n_ignored"] for r in records),
                        "recall": len(pairs) / n_gt if n_gt else math.nan,
                        "precision": len(pairs) / n_pred if n_pred else math.nan}
    out["dice"] = {"mean": _nan_mean(p["dice"] for p in pairs),
                   "vertebrae_mean": _nan_mean(p["dice"] for p in vb),
                   "sacrum_mean": _nan_mean(p["dice"] for p in pairs if p["gt_class"] == SACRUM_CLASS),
                   "mean_including_missed": (sum(p["dice"] for p in pairs) / n_gt) if n_gt else math.nan}
    per_study_ok = [all(p["pred_level"] == p["gt_level"] for p in r["pairs"]) for r in records if r["pairs"]]
    out["levels"] = {
        "accuracy": metrics.accuracy([p["pred_level"] for p in pairs], [p["gt_level"] for p in pairs]),
        "n": len(pairs),
        "studies_all_correct": _nan_mean(per_study_ok),
        "confusion": {"labels": list(LEVELS) + [None], "matrix_rows_truth": metrics.confusion_matrix(
            [p["pred_level"] for p in pairs], [p["gt_level"] for p in pairs], list(LEVELS) + [None])},
    }
    out["bmd"] = OrderedDict()
    for m in METHODS:
        per_level = OrderedDict()
        for lv in LEVELS:
            ps = [p for p in pairs if p["gt_level"] == lv]
            if ps:
                per_level[lv] = _summary(ps, m)
        out["bmd"][m] = {"vertebrae": _summary(vb, m), "all": _summary(pairs, m), "per_level": per_level}
    lab = [p for r in records for p in r["by_label"] if p["gt_class"] == VERTEBRAL_BODY_CLASS]
    out["bmd_by_label"] = OrderedDict((m, _summary(lab, m)) for m in METHODS)
    out["acr"] = OrderedDict()
    for m in ACR_METHODS:
        ps = [(r["patient"].get(m), r["patient"]["truth"]["category"]) for r in records
              if r["patient"]["truth"]["category"] is not None]
        out["acr"][m] = {"accuracy": metrics.accuracy([a for a, _ in ps], [b for _, b in ps]), "n": len(ps),
                         "not_given": sum(1 for a, _ in ps if a is None),
                         "confusion": {"labels": list(ACR_CATEGORIES), "matrix_rows_truth": metrics.confusion_matrix(
                             [a for a, _ in ps], [b for _, b in ps], ACR_CATEGORIES)}}
    return out


def rescan_groups(scan_records: List[Dict], method: str) -> List[List[Optional[float]]]:
    """Per true vertebra, its values over the scans of one patient (pairs by overlap).

    Args:
        scan_records: :func:`study_record` records of the same phantom, one per scan.
        method: one of :data:`METHODS`.

    Returns:
        one list per true level seen in any scan (None where a scan did not measure it).
    """
    by_level: Dict[str, List[Optional[float]]] = OrderedDict()
    for r in scan_records:
        for p in r["pairs"]:
            by_level.setdefault(p["gt_level"], [])
    for r in scan_records:
        got = {p["gt_level"]: p["pred"].get(method) for p in r["pairs"]}
        for lv in by_level:
            by_level[lv].append(got.get(lv))
    return list(by_level.values())


def _body_scans(scans: List[Dict]) -> List[Dict]:
    """The scan records with only their vertebral-body pairs (the re-scan precision's subjects)."""
    return [{"pairs": [p for p in r["pairs"] if p["gt_class"] == VERTEBRAL_BODY_CLASS]} for r in scans]


def precision_detail(patients: List[List[Dict]]) -> List[Dict[str, Any]]:
    """Per re-scanned vertebral body: its truth and each method's values over the scans (None where not measured),
    so the subjects that dominate the RMS-CV can be found.

    Args:
        patients: per patient, the records of its scans (the first is the study itself).
    """
    out = []
    for scans in patients:
        vb_scans = _body_scans(scans)
        truth = OrderedDict()
        for r in vb_scans:
            for p in r["pairs"]:
                truth.setdefault(p["gt_level"], p["gt_bmd"])
        values = {m: rescan_groups(vb_scans, m) for m in METHODS}
        for j, (lv, bmd) in enumerate(truth.items()):
            out.append(OrderedDict(study_id=scans[0]["study_id"], level=lv, gt_bmd=bmd,
                                   values={m: values[m][j] for m in METHODS}))
    return out


def summarize_precision(patients: List[List[Dict]]) -> Dict[str, Any]:
    """Re-scan precision per method: :func:`~bmd_d2.evaluation.metrics.precision_rms` over all vertebrae of all
    patients (vertebral bodies T11–L5 only).

    Args:
        patients: per patient, the records of its scans.
    """
    out: Dict[str, Any] = OrderedDict()
    out["patients"] = len(patients)
    out["scans_per_patient"] = [len(s) for s in patients]
    for m in METHODS:
        groups = []
        for scans in patients:
            vb_scans = _body_scans(scans)
            groups += rescan_groups(vb_scans, m)
        out[m] = metrics.precision_rms(groups)
    return out
