"""A trained model on a real CT with vertebral-body labels (issue 10): behind ``tools/eval_real_ct.py``.

The study is measured by :class:`~bmd_d2.measure.BMDStudyPredictor`; the body labels (TotalSegmentator's 19 = T12 …
24 = L5 by default) are sampled into the study's sagittal image through the exact transform, and every reported
vertebra is scored against them: the level it overlaps most and the Dice of its mask against the label of its own
level. :func:`passes` is the issue's acceptance (T12–L5 detected, labelled correctly, Dice ≥ ``min_dice``).
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bmd_d2.utils.matching import dice

logger = logging.getLogger(__name__)

__all__ = ["BODY_LABELS", "REQUIRED", "evaluate", "passes", "measure_real_ct", "format_table", "format_patient"]

BODY_LABELS = {19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"}
REQUIRED = ("T12", "L1", "L2", "L3", "L4", "L5")


def evaluate(result, labels, label_names: Dict[int, str] = BODY_LABELS) -> Dict:
    """Compare a :class:`~bmd_d2.measure.result.StudyResult` with a body-label volume.

    Args:
        result: the study result (``sagittal`` and per-vertebra ``mask`` (H, W) bool must be present).
        labels: ``Volume`` of body labels in the same patient space.
        label_names: label value → level name.

    Returns:
        ``rows``: per reported vertebra ``level``, ``score``, ``best_label`` (level of the label it overlaps most, or
        None), ``dice`` (vs the label of its own level; None without one), ``best_dice``, ``trabecular_hu``,
        ``learned_bmd``, ``classical_bmd``, ``qc_flags``; ``missed``: labelled levels no vertebra was assigned to;
        ``label_areas``: pixels of each level's label in the mid-plane.
    """
    from bmd_d2.data.sagittal import sample_volume_to_sagittal

    L = sample_volume_to_sagittal(result.sagittal, labels, order=0)[1]
    by_name = {name: L == value for value, name in label_names.items()}
    rows: List[Dict] = []
    for v in result.vertebrae:
        m = v.mask if v.mask is not None else np.zeros(L.shape, bool)
        scores = {name: dice(m, gt) for name, gt in by_name.items() if gt.any()}
        best = max(scores, key=scores.get) if scores and max(scores.values()) > 0 else None
        rows.append(dict(level=v.level, score=v.score, best_label=best,
                         dice=scores.get(v.level) if v.level in by_name else None,
                         best_dice=scores.get(best) if best else 0.0, trabecular_hu=v.trabecular_hu,
                         trabecular_hu_3d=v.trabecular_hu_3d, learned_bmd=v.learned_bmd,
                         classical_bmd=v.classical_bmd, qc_flags=list(v.qc_flags)))
    reported = {r["level"] for r in rows}
    missed = [name for name, gt in by_name.items() if gt.any() and name not in reported]
    return dict(rows=rows, missed=missed, label_areas={name: int(gt.sum()) for name, gt in by_name.items()})


def passes(summary: Dict, min_dice: float, required: Sequence[str] = REQUIRED) -> List[str]:
    """Reasons the issue-10 acceptance fails (empty list = passes): a required level missing, mislabelled, or with
    Dice below ``min_dice``."""
    problems = []
    by_level = {r["level"]: r for r in summary["rows"] if r["level"]}
    for lv in required:
        r = by_level.get(lv)
        if r is None:
            problems.append(f"{lv}: not detected")
        elif r["best_label"] != lv:
            problems.append(f"{lv}: overlaps {r['best_label']} most (mislabelled)")
        elif r["dice"] is None or r["dice"] < min_dice:
            problems.append(f"{lv}: Dice {r['dice']:.3f} < {min_dice}")
    return problems


def measure_real_ct(config_file: str, ct: str, labels: str, weights: str = "", opts: Optional[List[str]] = None,
                    out: str = "") -> Tuple[object, Dict]:
    """Measure the CT ``ct`` (study id ``example_ct``) and evaluate it against the body labels ``labels``.

    Args:
        config_file: model config.
        ct: NIfTI CT.
        labels: NIfTI body labels (:data:`BODY_LABELS` values).
        weights: model weights (default: the config's ``MODEL.WEIGHTS``).
        opts: config overrides, KEY VALUE pairs.
        out: when given, the folder ``overlay.png`` and ``result.json`` are written to.

    Returns:
        (StudyResult, summary dict from :func:`evaluate`).

    Raises:
        BMDError: a bad config, weights file or input.
    """
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.dicom import load_nifti
    from bmd_d2.measure import BMDStudyPredictor
    from bmd_d2.reports.overlay import write_overlay
    from bmd_d2.reports.tables import write_json

    opts = list(opts or [])
    if weights:
        opts += ["MODEL.WEIGHTS", weights]
    cfg = get_bmd_cfg(config_file, opts)
    result = BMDStudyPredictor(cfg)(ct, study_id="example_ct")
    summary = evaluate(result, load_nifti(labels, dtype=np.int16))
    if out:
        os.makedirs(out, exist_ok=True)
        write_overlay(result, os.path.join(out, "overlay.png"))
        write_json(result, os.path.join(out, "result.json"))
    return result, summary


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def format_table(summary: Dict) -> str:
    """The per-vertebra table (what ``tools/eval_real_ct.py`` prints), without the final newline."""
    lines = [f"{'level':6s} {'score':>6s} {'overlaps':>8s} {'Dice':>6s} {'HU':>7s} {'HU 3-D':>7s} {'learned':>8s} "
             f"{'classical':>9s}  flags"]
    for r in summary["rows"]:
        lines.append(f"{r['level'] or '?':6s} {r['score']:6.3f} {r['best_label'] or '-':>8s} "
                     f"{_f(r['dice'], '{:.3f}'):>6s} {_f(r['trabecular_hu']):>7s} {_f(r['trabecular_hu_3d']):>7s} "
                     f"{_f(r['learned_bmd']):>8s} {_f(r['classical_bmd']):>9s}  {','.join(r['qc_flags'])}")
    if summary["missed"]:
        lines.append("not detected: " + ", ".join(summary["missed"]))
    return "\n".join(lines)


def format_patient(result) -> str:
    """One line: the patient's ACR BMD and category, L1 HU and the study's QC flags."""
    p = result.patient
    return (f"patient: ACR {_f(p.get('acr_bmd'))} mg/cm³ ({p.get('acr_category')}), L1 {_f(p.get('l1_hu'))} HU; "
            f"study flags: {', '.join(result.qc_flags) or '-'}")
