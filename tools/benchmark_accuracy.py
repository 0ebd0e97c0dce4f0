#!/usr/bin/env python
"""Accuracy of the measuring pipeline on held-out generated phantoms: BMD vs truth, Dice, levels, categories, re-scan
precision. Prints tables, writes JSON and Bland–Altman / scatter PNGs.

    python tools/benchmark_accuracy.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml --weights model.pth \\
        --n 50 --output output/benchmark/accuracy.json
    python tools/benchmark_accuracy.py ... --calibration phantom.json     # classical BMD with a file calibration
    python tools/benchmark_accuracy.py ... --phantom tiny --n 2 --rescan-patients 1   # smoke test (seconds)
    python tools/benchmark_accuracy.py ... --n 12 --rescan-patients 0 \
        --phantom-option matrix=144 --phantom-option pixel_spacing=3.0 --phantom-option slice_thickness=3.0  # 3 mm

Held-out studies: study i has seed ``study_seed(--seed, i)`` (default base 9000; training uses other base seeds) and
the generator's full variation (``--phantom full``: 512² series, random kVp/calibration, noise, slice thickness
0.625–3 mm, pixel spacing, encoding, fractures, metal, contrast). Each study is written as DICOM and measured with
``BMDStudyPredictor(cfg)`` — exactly what ``bmd-measure`` does — then matched to its truth by
:mod:`bmd_d2.evaluation.study_accuracy` (mask IoU ≥ ``MEASURE.EVAL_MATCH_IOU`` with the truth labels sampled into the
sagittal image, and by level label).

Calibration: classical BMD turns HU into mg/cm³ through ``HU = slope·BMD + intercept``. ``classical`` uses the
configured calibration (the generic default slope 1, intercept 0, or ``--calibration``), as ``bmd-measure`` reports it;
each phantom has its own scanner calibration (``calib_a``, ``calib_b`` in phantom.json, slope 0.8–1.25), so the
default is off by up to ±25 %. ``classical_true_cal`` applies the per-study true calibration to the same HU: a
phantom-calibrated scanner (what QCT requires). The learned BMD needs no calibration.

Re-scan precision: the first ``--rescan-patients`` studies are scanned ``--rescans`` more times
(``PhantomOptions.rescan_seed``: same patient, scanner and BMD; new noise, position and scan start); RMS-SD, CV-RMSSD %
(RMS-SD / the vertebrae's mean BMD, Wang et al. 2017: the re-scan CV target) and Glüer's RMS-CV % (1995; one vertebra
near 0 mg/cm³ can decide it) over vertebrae.

Targets (issue 7): per-level MAE ≤ 5 mg/cm³ (aim ≤ 3), r ≥ 0.97, Dice ≥ 0.9, level accuracy ≥ 99 %.

The benchmark is :mod:`bmd_d2.evaluation.benchmark_accuracy`; this script parses the options, prints the tables and
writes the JSON.
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))

from bmd_d2.evaluation.benchmark_accuracy import format_report, parse_phantom_options, run  # noqa: E402
from bmd_d2.evaluation.benchmark_speed import write_json  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(TOOLS), "configs", "bmd_rcnn_MFEFPN_R18_cpu.yaml")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="Trailing KEY VALUE pairs override config keys.")
    ap.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="model config (default: %(default)s)")
    ap.add_argument("--weights", metavar="FILE", help="trained weights (MODEL.WEIGHTS; none = random init)")
    ap.add_argument("--device", help="cpu or cuda[:N] (MODEL.DEVICE; default: the config's)")
    ap.add_argument("--n", type=int, default=50, help="held-out studies (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=9000, help="base seed: study i uses study_seed(seed, i)")
    ap.add_argument("--phantom", choices=("full", "tiny"), default="full", help="study size (tiny: tests only)")
    ap.add_argument("--phantom-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a PhantomOptions field for every study, e.g. pixel_spacing=3.0 (repeatable; the value\n"
                         "is read as a Python literal: 3.0, 144, True, 'j2k')")
    ap.add_argument("--calibration", metavar="JSON", help="calibration file for 'classical' (MEASURE.CALIBRATION_FILE)")
    ap.add_argument("--rescan-patients", type=int, default=10, help="studies re-scanned for precision")
    ap.add_argument("--rescans", type=int, default=2, help="extra scans per re-scanned study")
    ap.add_argument("--output", default="output/benchmark/accuracy.json",
                    help="JSON file; plots go to accuracy_plots/ beside it (default: %(default)s)")
    ap.add_argument("--no-plots", action="store_true", help="do not write the PNGs")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only on stderr")
    ap.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return ap


def print_report(rep: Dict[str, Any], out=sys.stdout):
    """The accuracy tables on ``out``."""
    print(format_report(rep), file=out)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from bmd_d2.errors import BMDError

    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        args.phantom_options = parse_phantom_options(args.phantom_option)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rep = run(args)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(rep)
    write_json(rep, args.output)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
