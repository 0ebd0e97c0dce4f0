"""Pure metric functions for BMD evaluation: small, NumPy-only, checkable by hand.

Every function takes plain sequences/arrays and returns Python floats (``nan`` when a value is undefined, e.g. the
Pearson r of fewer than two pairs or of a constant sequence), so the results serialise to JSON directly.
BMD values are in mg/cm³; differences are ``pred - truth``. The overlap and matching functions (``dice``,
``mask_iou_matrix``, ``match_greedy``) live in :mod:`bmd_d2.utils.matching` and are re-exported here.
"""
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from bmd_d2.utils.matching import dice, mask_iou_matrix, match_greedy

__all__ = [
    "mae", "rmse", "bias", "pearson_r", "bland_altman", "regression_summary", "accuracy", "confusion_matrix",
    "dice", "mask_iou_matrix", "match_greedy", "precision_rms",
]


def _pairs(pred, truth) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(truth, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth differ in length: {p.size} vs {t.size}")
    return p, t


def mae(pred: Sequence[float], truth: Sequence[float]) -> float:
    """Mean absolute error ``mean(|pred - truth|)``; ``nan`` for no pairs."""
    p, t = _pairs(pred, truth)
    return float(np.mean(np.abs(p - t))) if p.size else math.nan


def rmse(pred: Sequence[float], truth: Sequence[float]) -> float:
    """Root mean squared error ``sqrt(mean((pred - truth)^2))``; ``nan`` for no pairs."""
    p, t = _pairs(pred, truth)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else math.nan


def bias(pred: Sequence[float], truth: Sequence[float]) -> float:
    """Mean signed error ``mean(pred - truth)`` (positive: the prediction over-estimates); ``nan`` for no pairs."""
    p, t = _pairs(pred, truth)
    return float(np.mean(p - t)) if p.size else math.nan


def pearson_r(pred: Sequence[float], truth: Sequence[float]) -> float:
    """Pearson correlation coefficient; ``nan`` for fewer than 2 pairs or zero variance in either sequence."""
    p, t = _pairs(pred, truth)
    if p.size < 2:
        return math.nan
    dp, dt = p - p.mean(), t - t.mean()
    denom = math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt)))
    return float(np.sum(dp * dt) / denom) if denom > 0 else math.nan


def bland_altman(pred: Sequence[float], truth: Sequence[float]) -> Dict[str, float]:
    """Bland–Altman agreement (Bland & Altman, Lancet 1986): bias and 95 % limits of agreement.

    Returns:
        dict with ``bias`` = mean(pred - truth), ``sd`` = sample SD (ddof=1) of the differences, ``loa_low`` /
        ``loa_high`` = bias ∓ 1.96·sd, and ``n``. SD and limits are ``nan`` for fewer than 2 pairs.
    """
    p, t = _pairs(pred, truth)
    d = p - t
    b = float(d.mean()) if d.size else math.nan
    sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
    return {"n": int(d.size), "bias": b, "sd": sd, "loa_low": b - 1.96 * sd, "loa_high": b + 1.96 * sd}


def regression_summary(pred: Sequence[float], truth: Sequence[float]) -> Dict[str, float]:
    """All agreement figures of a set of pairs: n, MAE, RMSE, bias, Pearson r, Bland–Altman SD and limits."""
    ba = bland_altman(pred, truth)
    return {"n": ba["n"], "mae": mae(pred, truth), "rmse": rmse(pred, truth), "bias": ba["bias"],
            "pearson_r": pearson_r(pred, truth), "sd_diff": ba["sd"], "loa_low": ba["loa_low"],
            "loa_high": ba["loa_high"]}


def accuracy(pred: Sequence, truth: Sequence) -> float:
    """Fraction of equal labels; ``nan`` for no pairs."""
    pred, truth = list(pred), list(truth)
    if len(pred) != len(truth):
        raise ValueError(f"pred and truth differ in length: {len(pred)} vs {len(truth)}")
    return sum(a == b for a, b in zip(pred, truth)) / len(pred) if pred else math.nan


def confusion_matrix(pred: Sequence, truth: Sequence, labels: Sequence) -> List[List[int]]:
    """Counts ``m[i][j]`` of items whose truth is ``labels[i]`` and prediction ``labels[j]`` (rows = truth).

    Items whose truth or prediction is not in ``labels`` are not counted.
    """
    index = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for p, t in zip(pred, truth):
        if p in index and t in index:
            m[index[t]][index[p]] += 1
    return m


def precision_rms(groups: Sequence[Sequence[float]]) -> Dict[str, float]:
    """Short-term (re-scan) precision of repeated measurements, pooled as root mean squares (Glüer et al., Osteoporos
    Int 1995;5:262–270): each group holds one subject's (here: one vertebra's) repeated values.

    Args:
        groups: per subject, its repeated measurements (mg/cm³); groups with fewer than 2 finite values are skipped.

    Returns:
        dict with ``n_subjects``, ``n_measurements``, ``rms_sd`` = sqrt(mean_j SD_j²) (SD with ddof=1, mg/cm³),
        ``rms_cv_pct`` = 100·sqrt(mean_j (SD_j / mean_j)²) (%, Glüer's RMS-CV: one subject near 0 mg/cm³ can
        dominate it), ``cv_rmssd_pct`` = 100·rms_sd / mean_j(mean_j) (%, the RMS-SD relative to the subjects' mean
        BMD: "CV-RMSSD", Wang et al., Sci Rep 2017;7:6284), ``mean`` = mean_j(mean_j) (mg/cm³) and ``dof`` =
        Σ(n_j − 1). ``nan`` without a usable group; subjects with a non-positive mean are left out of the CVs.
    """
    sds, cvs, means, n_meas, dof = [], [], [], 0, 0
    for g in groups:
        v = np.asarray([x for x in g if x is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size < 2:
            continue
        sd = float(v.std(ddof=1))
        sds.append(sd)
        if v.mean() > 0:
            cvs.append(sd / float(v.mean()))
            means.append(float(v.mean()))
        n_meas += int(v.size)
        dof += int(v.size) - 1
    rms_sd = float(np.sqrt(np.mean(np.square(sds)))) if sds else math.nan
    return {"n_subjects": len(sds), "n_measurements": n_meas, "dof": dof, "rms_sd": rms_sd,
            "rms_cv_pct": 100.0 * float(np.sqrt(np.mean(np.square(cvs)))) if cvs else math.nan,
            "cv_rmssd_pct": 100.0 * rms_sd / float(np.mean(means)) if means else math.nan,
            "mean": float(np.mean(means)) if means else math.nan}
