#!/usr/bin/env python
"""Measure the snapshot studies (bmd_d2.evaluation.snapshot) and save or compare their results.

    python tools/snapshot_results.py --out output/snapshot_before            # before a change
    python tools/snapshot_results.py --out output/snapshot_after --compare output/snapshot_before

Writes ``<out>/<study>.json`` (the full result) and ``<out>/seconds.json`` (time per study, model loaded once per
calibration). With ``--compare`` prints every difference (floats to ``--atol``) and exits 1 when there is one.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the result JSON files")
    ap.add_argument("--compare", help="folder of an earlier run to compare with")
    ap.add_argument("--config-file", default=os.path.join(ROOT, "configs", "bmd_default.yaml"))
    ap.add_argument("--atol", type=float, default=1e-6)
    args = ap.parse_args(argv)

    import torch

    from bmd_d2 import BMDError
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.evaluation.snapshot import comparable, compare_folders, snapshot_studies
    from bmd_d2.measure import BMDStudyPredictor

    os.chdir(ROOT)  # the default config names its weights relative to the repository
    os.makedirs(args.out, exist_ok=True)
    seconds = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bmd_snapshot_") as tmp:
            predictors = {}
            for name, src, cal in snapshot_studies(tmp, ROOT):
                if cal not in predictors:
                    torch.manual_seed(0)
                    opts = ["MEASURE.CALIBRATION_FILE", cal] if cal else []
                    predictors[cal] = BMDStudyPredictor(get_bmd_cfg(args.config_file, opts))
                t = time.perf_counter()
                res = predictors[cal](src, study_id=name)
                seconds[name] = round(time.perf_counter() - t, 3)
                with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                    json.dump(comparable(res.to_dict()), f, indent=1, sort_keys=True)
                print(f"{name}: {len(res.vertebrae)} vertebrae, {seconds[name]:.2f} s")
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "seconds.json"), "w") as f:
        json.dump(seconds, f, indent=1)
    if not args.compare:
        return 0
    diffs = compare_folders(args.compare, args.out, list(seconds), args.atol)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s) against {args.compare} (floats to {args.atol:g})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
