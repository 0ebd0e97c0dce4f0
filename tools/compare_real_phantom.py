#!/usr/bin/env python
"""Compare the real example CT with phantoms rendered at the same resolution (3 mm voxels).

For the real CT (``tests/data/real/totalseg_example_ct``: CT, vertebral-body labels, body/disc labels) and for
``--n`` phantoms (``generate_study`` with 3 mm pixels and 3 mm slices, body labels from the generator) the same
measurements are made, anatomically defined where possible so that no threshold decides the answer: tissue HU
distributions (fat, paraspinal muscle, trabecular, cortical, disc), noise and texture, vertebral-body geometry. They
are :mod:`bmd_d2.evaluation.real_vs_phantom` (definitions in its docstring); this script parses the options and
prints the tables.

Usage: ``python tools/compare_real_phantom.py [--n 4] [--seed 0] [--real tests/data/real/totalseg_example_ct]``
Prints tables (this is a report tool); findings are written up in docs/real_vs_phantom.md.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bmd_d2.evaluation.real_vs_phantom import format_report, load_real, phantom  # noqa: E402

logger = logging.getLogger("compare_real_phantom")

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "real", "totalseg_example_ct")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="number of phantoms")
    ap.add_argument("--seed", type=int, default=0, help="first phantom seed")
    ap.add_argument("--real", default=REAL, help="folder of the real example CT and its labels")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = [load_real(args.real)]
    for s in range(args.seed, args.seed + args.n):
        logger.info("rendering phantom seed %d at 3 mm", s)
        results.append(phantom(s))
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
