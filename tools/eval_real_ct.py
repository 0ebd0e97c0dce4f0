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

The measuring and scoring are :mod:`bmd_d2.evaluation.real_ct`; this script parses the options and prints.

Usage::

    python tools/eval_real_ct.py --config-file configs/<default>.yaml --weights model_final.pth --out output/real_ct
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bmd_d2.evaluation.real_ct import format_patient, format_table, measure_real_ct, passes  # noqa: E402

logger = logging.getLogger("eval_real_ct")

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "real", "totalseg_example_ct")


def run(config_file: str, weights: str = "", opts=None, ct: str = "", labels: str = "", out: str = ""):
    """Measure the real CT (default: the example CT and its TotalSegmentator labels) and evaluate it.

    Returns:
        (StudyResult, summary dict from :func:`~bmd_d2.evaluation.real_ct.evaluate`); writes ``overlay.png`` and
        ``result.json`` to ``out`` when given.
    """
    ct = ct or os.path.join(REAL, "example_ct.nii.gz")
    labels = labels or os.path.join(REAL, "totalseg_vertebrae_pp_refined.nii.gz")
    result, summary = measure_real_ct(config_file, ct, labels, weights=weights, opts=opts, out=out)
    if out:
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
    print(format_table(summary))
    print(format_patient(result))
    problems = passes(summary, args.min_dice)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
