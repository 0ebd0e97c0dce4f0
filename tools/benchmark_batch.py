#!/usr/bin/env python
"""Cohort-scale batch benchmark of ``bmd-measure --batch`` (issue 21): studies/hour with 1 and 2 workers, and the
fault run (a worker and the driver killed mid-batch, then resumed; every good study measured, every corrupt one
reported). Prints tables and writes JSON.

    python tools/benchmark_batch.py --weights models/bmd_rcnn_MFEFPN_R18_cpu.pth --root /tmp/cohort \\
        --studies 200 --corrupt-fraction 0.1 --output output/benchmark/batch.json
    python tools/benchmark_batch.py ... --generate-only      # write the cohort (reused by later runs) and stop

The sections are :mod:`bmd_d2.evaluation.benchmark_batch`; the cohort under ``--root`` is reused when it exists
(delete it when done: 200 full studies take ~15 GB).
"""
import argparse
import json
import logging
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))

from bmd_d2.evaluation.benchmark_batch import format_report, make_cohort, run  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(TOOLS), "configs", "bmd_rcnn_MFEFPN_R18_cpu.yaml")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    ap.add_argument("--weights", metavar="FILE", help="trained weights (the shipped model for real figures)")
    ap.add_argument("--root", default="output/benchmark/cohort", help="cohort and run folders (default: %(default)s)")
    ap.add_argument("--output", default="output/benchmark/batch.json", help="JSON file (default: %(default)s)")
    ap.add_argument("--studies", type=int, default=200, help="cohort size")
    ap.add_argument("--corrupt-fraction", type=float, default=0.1)
    ap.add_argument("--phantom", choices=("full", "tiny"), default="full")
    ap.add_argument("--seed", type=int, default=7700)
    ap.add_argument("--workers", default="1,2", help="worker counts of the throughput runs (1 = in-process)")
    ap.add_argument("--throughput-studies", type=int, default=40, help="good studies per throughput run")
    ap.add_argument("--kill-worker-at", type=int, default=40, help="fault run: SIGKILL a worker after N finished")
    ap.add_argument("--kill-driver-at", type=int, default=100, help="fault run: SIGKILL the driver after N finished")
    ap.add_argument("--skip-fault", action="store_true")
    ap.add_argument("--generate-only", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.generate_only:
        recs = make_cohort(os.path.abspath(args.root), args.studies, args.corrupt_fraction, args.seed, args.phantom)
        print(f"cohort: {len(recs)} studies, {sum(r['kind'] != 'good' for r in recs)} corrupt, in {args.root}")
        return 0
    rep = run(args)
    print(format_report(rep))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
    print(f"wrote {args.output}")
    return 0 if rep.get("fault", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
