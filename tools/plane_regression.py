#!/usr/bin/env python
"""Check that a change to the sagittal code keeps the mid-sagittal planes and images: record them, change, compare.

    python tools/plane_regression.py record /tmp/planes_before.pkl       # before the change
    python tools/plane_regression.py compare /tmp/planes_before.pkl      # after: exit 1 if a plane moved

Studies: every ``DIR/*/dicom`` of ``--studies-dir`` (default ``datasets/bmd_phantoms_val/studies``), the example
study and the real CTs of ``tests/data/real`` (NIfTI and DICOM). Per study the plane (point, normal), the
``SagittalImage`` transform, the uint8 image and the HU are stored with the sagittal parameters of ``--config-file``.
``compare`` prints per study the plane shift (distance of the old point from the new plane, mm), the angle between
the normals, the largest transform difference and the image / HU differences; it fails when any plane moved by
``--max-mm`` (0.5) or more, turned by ``--max-deg`` (0.5) or more, or an image changed in more than
``--max-pixels`` (0) pixels by more than 2 grey levels. The plane search times are printed too (same machine load
needed to compare them). The measuring and comparing are :mod:`bmd_d2.evaluation.plane_regression`; this script
parses the options, prints and writes / reads the pickle.
"""
import argparse
import logging
import os
import pickle
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bmd_d2.evaluation.plane_regression import (  # noqa: E402
    compare_planes,
    format_comparison,
    format_plane,
    measure_planes,
)


def measure(args):
    """Every study's plane record (name → record), each printed as it is measured."""
    out = {}
    for name, shape, rec in measure_planes(args.studies_dir, ROOT, args.config_file):
        out[name] = rec
        print(format_plane(name, shape, rec), flush=True)
    return out


def compare(ref, new, args) -> bool:
    """Print the comparison of ``new`` with ``ref``; True when no plane moved or image changed."""
    rows, summary = compare_planes(ref, new, args.max_mm, args.max_deg, args.max_pixels)
    print(format_comparison(rows, summary))
    return summary["ok"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("file", help="pickle written by record, read by compare")
    ap.add_argument("--studies-dir", default=os.path.join(ROOT, "datasets", "bmd_phantoms_val", "studies"))
    ap.add_argument("--config-file", default="", help="config whose INPUT.DICOM sagittal parameters are used")
    ap.add_argument("--max-mm", type=float, default=0.5)
    ap.add_argument("--max-deg", type=float, default=0.5)
    ap.add_argument("--max-pixels", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    res = measure(args)
    if args.mode == "record":
        with open(args.file, "wb") as f:
            pickle.dump(res, f)
        print(f"wrote {args.file} ({len(res)} studies)")
        return 0
    with open(args.file, "rb") as f:
        ref = pickle.load(f)
    return 0 if compare(ref, res, args) else 1


if __name__ == "__main__":
    sys.exit(main())
