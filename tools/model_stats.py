#!/usr/bin/env python
"""Parameter counts and FLOPs (fvcore) of bmd_d2 model configs.

    python tools/model_stats.py                                  # every configs/**/*.yaml
    python tools/model_stats.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml [--size 512]

FLOPs are fvcore's (one fused multiply-add = 1 flop) for one square image at the config's test size, in eval mode.
The backbone figure is exact; the full-model figure runs with ``SCORE_THRESH_TEST = 0`` so the box branch sees
``POST_NMS_TOPK_TEST`` proposals and the mask/BMD branches ``DETECTIONS_PER_IMAGE`` detections (the worst case of an
untrained model). ROIAlign and NMS are not counted. The counting is :mod:`bmd_d2.evaluation.model_stats`; this
script parses the options and prints the table.
"""
import argparse
import glob
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bmd_d2.evaluation.model_stats import TABLE_HEADER, format_row, model_stats  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", action="append", help="config(s); default: every configs/**/*.yaml")
    parser.add_argument("--size", type=int, default=0, help="image side (default: INPUT.MIN_SIZE_TEST)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    files = args.config_file or sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    print(TABLE_HEADER)
    for f in files:
        print(format_row(model_stats(f, args.size, ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
