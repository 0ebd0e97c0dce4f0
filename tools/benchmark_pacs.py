#!/usr/bin/env python
"""Throughput of bmd-serve: studies per hour with 1 and 4 concurrent DICOM senders (docs/pacs.md, "Throughput").

One node (the shipped default model) receives N copies of the example study per pass from pynetdicom C-STORE clients
and sends SEG/SR/SC to a local Storage SCP; a pass is timed from the first send to the last delivery.

    python tools/benchmark_pacs.py [--studies 4] [--senders 1 4] [--json out.json] [--work DIR]
"""
import argparse
import json
import logging
import os
import signal
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=4, help="series sent per pass (default 4)")
    p.add_argument("--senders", type=int, nargs="+", default=[1, 4], help="concurrent senders, one pass each")
    p.add_argument("--config-file", default=os.path.join(ROOT, "configs", "bmd_default.yaml"))
    p.add_argument("--weights", default=os.path.join(ROOT, "models", "bmd_rcnn_MFEFPN_R18_cpu.pth"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet-seconds", type=float, default=10.0, help="the node's series.quiet_seconds (default 10)")
    p.add_argument("--work", default="", help="folder for the node and the example series (default: a temp dir)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from bmd_d2.errors import BMDError
    from bmd_d2.serve.benchmark import run_benchmark

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the node is stopped on the way out
    work = args.work or tempfile.mkdtemp(prefix="bmd_pacs_bench_")
    try:
        res = run_benchmark(work, args.studies, args.senders, args.config_file, args.weights, args.device,
                            args.quiet_seconds)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['studies_per_pass']} studies of {res['slices_per_study']} slices per pass, quiet time "
          f"{res['quiet_seconds']:g} s, {res['device']}, {res['cpu_count']} CPUs "
          f"(node start {res['node_startup_s']} s)")
    print(f"{'senders':>7} {'seconds':>8} {'studies/h':>10} {'latency s (mean)':>17}")
    for r in res["passes"]:
        mean = sum(r["latency_s"]) / len(r["latency_s"])
        print(f"{r['senders']:>7} {r['seconds']:>8.1f} {r['studies_per_hour']:>10.1f} {mean:>17.1f}")
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
