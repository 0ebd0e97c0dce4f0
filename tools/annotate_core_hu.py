#!/usr/bin/env python
"""Write the measurement's 3-D core HU (``core_hu``) into a prepared dataset's annotations: the training data of a
BMD head with ``MODEL.ROI_BMD_HEAD.TARGET "hu_correction"`` (see :mod:`bmd_d2.evaluation.core_hu`).

    python tools/annotate_core_hu.py datasets/bmd_phantoms_train_v7a/annotations.json \
        --config-file configs/bmd_default.yaml --workers 2 [KEY VALUE ...]
"""
import argparse
import logging
import sys

from bmd_d2.errors import BMDError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("annotations", help="the dataset's annotations.json (rewritten in place)")
    ap.add_argument("--config-file", required=True, help="the measuring config (model and MEASURE settings)")
    ap.add_argument("--workers", type=int, default=1, help="processes, each with its own predictor")
    ap.add_argument("--min-iou", type=float, default=0.5, help="least mask IoU of an annotation and its vertebra")
    ap.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.evaluation.core_hu import annotate_core_hu

    try:
        cfg = get_bmd_cfg(args.config_file, args.opts)
        counts = annotate_core_hu(args.annotations, cfg, min_iou=args.min_iou, workers=args.workers)
    except BMDError as e:
        print(f"annotate_core_hu: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.annotations}: {counts['with_core']} of {counts['annotations']} annotations of "
          f"{counts['images']} studies have core_hu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
