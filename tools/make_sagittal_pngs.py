#!/usr/bin/env python
"""Write a few sagittal PNGs (3-slice image + label outlines + found plane) from generated phantom studies.

Each PNG shows the model's 3-channel image and the mid-plane channel with the vertebral-body labels outlined, and the
plane fit in the title bar (see :mod:`bmd_d2.evaluation.sagittal_pngs`, which renders them; this script parses the
options).

Usage: ``python tools/make_sagittal_pngs.py --out docs/images --n 3 --seed 0 [--full]``
(``--full`` renders full-size 512² studies; the default is the phantom generator's tiny option).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bmd_d2.evaluation.sagittal_pngs import write_sagittal_pngs  # noqa: E402

logger = logging.getLogger("make_sagittal_pngs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full-size studies (slower)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bmd_d2.errors import BMDError

    try:
        for path, levels in write_sagittal_pngs(args.out, args.n, seed=args.seed, full=args.full):
            logger.info("%s (levels in plane: %s)", path, levels)
    except BMDError as ex:
        logger.error("error: %s", ex)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
