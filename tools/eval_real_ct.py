#!/usr/bin/env python
"""End-to-end check of a trained model on the real example CT (tests/data/real, see its ATTRIBUTION.md).

Runs :class:`bmd_d2.measure.BMDStudyPredictor` on ``example_ct.nii.gz`` (3 mm, T11…S1) with the given config and
weights, samples TotalSegmentator's vertebral-body labels (19 = T12 … 24 = L5) into the study's sagittal image through
the exact transform, and prints per detected vertebra: the level the measurement assigned, the label it overlaps most,
the Dice of the predicted sagittal mask against the body label of its assigned level (mid-plane), the classical
trabecular HU, the learned and classical BMD; then the ground-truth levels nobody detected. The overlay PNG and the
result JSON are written to ``--out``.

Issue 10's acceptance figures: T12–L5 detected and labelled correctly, Dice ≥ 0.85 per level (``--min-dice``; the exit
code is 1 when a level fails), classical HU plausible against the references (TotalSegmentator eroded-ROI means
131–145 HU, medians 110–129 HU, whole-body means 132–173 HU; see tests/test_real_ct.py for the ground-truth-mask
figures: 103–124 HU).

Usage::

    python tools/eval_real_ct.py --config-file configs/<default>.yaml --weights model_final.pth --out output/real_ct
"""
import argparse
import logging
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
logger = logging.getLogger("eval_real_ct")

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "real", "totalseg_example_ct")
BODY_LABELS = {19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"}
REQUIRED = ("T12", "L1", "L2", "L3", "L4", "L5")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


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


def passes(summary: Dict, min_dice: float, required=REQUIRED) -> List[str]:
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


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def print_table(summary: Dict) -> None:
    """Per-vertebra table (CLI output)."""
    print(f"{'level':6s} {'score':>6s} {'overlaps':>8s} {'Dice':>6s} {'HU':>7s} {'HU 3-D':>7s} {'learned':>8s} "
          f"{'classical':>9s}  flags")
    for r in summary["rows"]:
        print(f"{r['level'] or '?':6s} {r['score']:6.3f} {r['best_label'] or '-':>8s} {_f(r['dice'], '{:.3f}'):>6s} "
              f"{_f(r['trabecular_hu']):>7s} {_f(r['trabecular_hu_3d']):>7s} {_f(r['learned_bmd']):>8s} "
              f"{_f(r['classical_bmd']):>9s}  {','.join(r['qc_flags'])}")
    if summary["missed"]:
        print("not detected:", ", ".join(summary["missed"]))


def run(config_file: str, weights: str = "", opts=None, ct: str = "", labels: str = "", out: str = ""):
    """Measure the real CT and evaluate it.

    Returns:
        (StudyResult, summary dict from :func:`evaluate`); writes ``overlay.png`` and ``result.json`` to ``out`` when
        given.
    """
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.dicom import load_nifti
    from bmd_d2.measure import BMDStudyPredictor
    from bmd_d2.measure.report import write_json, write_overlay

    opts = list(opts or [])
    if weights:
        opts += ["MODEL.WEIGHTS", weights]
    cfg = get_bmd_cfg(config_file, opts)
    ct = ct or os.path.join(REAL, "example_ct.nii.gz")
    labels = labels or os.path.join(REAL, "totalseg_vertebrae_pp_refined.nii.gz")
    result = BMDStudyPredictor(cfg)(ct, study_id="example_ct")
    summary = evaluate(result, load_nifti(labels, dtype=np.int16))
    if out:
        os.makedirs(out, exist_ok=True)
        write_overlay(result, os.path.join(out, "overlay.png"))
        write_json(result, os.path.join(out, "result.json"))
        logger.info("wrote %s", os.path.join(out, "overlay.png"))
    return result, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate a bmd_d2 model on the real example CT (issue 10).")
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", default="", help="model weights (default: the config's MODEL.WEIGHTS)")
    ap.add_argument("--ct", default="", help="CT (default: tests/data/real/totalseg_example_ct/example_ct.nii.gz)")
    ap.add_argument("--labels", default="", help="body labels 19=T12 … 24=L5 (default: the TotalSegmentator file)")
    ap.add_argument("--out", default="output/real_ct", help="folder for overlay.png and result.json")
    ap.add_argument("--min-dice", type=float, default=0.85)
    ap.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from bmd_d2.errors import BMDError

    try:
        result, summary = run(args.config_file, args.weights, args.opts, args.ct, args.labels, args.out)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(summary)
    p = result.patient
    print(f"patient: ACR {_f(p.get('acr_bmd'))} mg/cm³ ({p.get('acr_category')}), L1 {_f(p.get('l1_hu'))} HU; "
          f"study flags: {', '.join(result.qc_flags) or '-'}")
    problems = passes(summary, args.min_dice)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
