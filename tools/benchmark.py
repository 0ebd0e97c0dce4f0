#!/usr/bin/env python
"""Speed benchmark of bmd_d2 in one run, with the machine described: series loading, end-to-end study time,
inference and training throughput, peak memory. Prints tables and writes JSON.

    python tools/benchmark.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml --weights model.pth \\
        --output output/benchmark/speed.json                       # defaults: 10 full-size studies, CPU
    python tools/benchmark.py ... --device cuda                    # the same on a GPU
    python tools/benchmark.py ... --phantom tiny --studies 2 --io-slices 8 --io-size 64   # smoke test (seconds)

Sections (each can be skipped with ``--skip io,e2e,infer,train``):

* ``io``: a synthetic ``--io-slices`` × ``--io-size``² CT series, ``tools/benchmark_io.py``'s comparison
  (:func:`bmd_d2.evaluation.io_speed.bench_io`; ``--repeat`` interleaved warm-cache rounds, best round each): the
  plain ``pydicom.dcmread(f).pixel_array`` loop, the same loop giving bmd_d2's output (sorted, HU float32, stacked)
  and ``bmd_d2.data.dicom.load_series`` (checked identical).
* ``e2e``: ``--studies`` generated phantom studies (``--phantom full``: 512² clinical series with random scanner,
  thickness, encoding; written as DICOM, not timed) measured through ``BMDStudyPredictor(cfg)(dicom_folder)``: load →
  sagittal image → model → levels, learned and classical BMD per level. The first study is measured once untimed
  (warm-up). p50/p95/mean per study and the split load / sagittal / model / measurement; within the measurement, the
  3-D level anchors (``find_level_anchors``: the last ribs traced and the sacroiliac joints found in the volume) per
  study, median and max (JSON ``e2e.anchors_p50_s``, ``anchors_max_s``, ``per_study_anchors_s``; issue 18 target:
  max ≤ 0.3 s on 2 CPU cores).
* ``infer``: model forward (``torch.no_grad``, eval mode) on the e2e studies' sagittal images, ``--infer-batch``
  images per call, after the test-time resize, images/s.
* ``train``: ``--train-iters`` iterations (after ``--train-warmup`` untimed ones) of Detectron2's
  ``SimpleTrainer.run_step`` — ``BMDDatasetMapper`` + train loader, forward, backward, SGD step — on
  ``--train-studies`` generated phantoms prepared
  as a sagittal dataset; images/s = iterations × ``SOLVER.IMS_PER_BATCH`` / time. The alternating-schedule hooks are
  not run (they only freeze parameter groups).
* memory: peak resident set size of this process per section (``VmHWM``, reset between sections via
  ``/proc/self/clear_refs``; else the process-lifetime ``ru_maxrss``), plus the largest child process (loader
  workers) and the CUDA peak allocation.
  Phantoms are rendered in a child process, so the generator's memory is not counted.

Target (issue 7): ≤ 2 s per study end to end on 2 CPU cores (compared with the e2e p50 and p95).
Exit code 2 with one ``error:`` line for a bad config, weights file or device. The sections are
:mod:`bmd_d2.evaluation.benchmark_speed`; this script parses the options, prints the tables and writes the JSON.
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))

from bmd_d2.evaluation.benchmark_speed import SECTIONS, format_report, run, write_json  # noqa: E402
from bmd_d2.evaluation.io_speed import bench_io  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(TOOLS), "configs", "bmd_rcnn_MFEFPN_R18_cpu.yaml")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="Trailing KEY VALUE pairs override config keys.")
    ap.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="model config (default: %(default)s)")
    ap.add_argument("--weights", metavar="FILE", help="trained weights (MODEL.WEIGHTS; none = random init)")
    ap.add_argument("--device", help="cpu or cuda[:N] (MODEL.DEVICE; default: the config's)")
    ap.add_argument("--output", default="output/benchmark/speed.json", help="JSON file (default: %(default)s)")
    ap.add_argument("--studies", type=int, default=10, help="generated studies for the end-to-end time")
    ap.add_argument("--studies-dir", default="",
                    help="measure the first --studies DICOM folders DIR/*/dicom (e.g. a dataset's studies/) instead "
                         "of generated phantoms (repeatable before/after comparisons, real series)")
    ap.add_argument("--phantom", choices=("full", "tiny"), default="full", help="study size (tiny: tests only)")
    ap.add_argument("--render", choices=("child", "inline"), default="child",
                    help="render phantoms in a child process (default) or in this one (faster start, memory counted)")
    ap.add_argument("--seed", type=int, default=9500, help="base seed of the generated studies")
    ap.add_argument("--io-slices", type=int, default=300)
    ap.add_argument("--io-size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="best-of repeats of the I/O timings")
    ap.add_argument("--infer-iters", type=int, default=20)
    ap.add_argument("--infer-batch", type=int, default=1)
    ap.add_argument("--train-iters", type=int, default=10)
    ap.add_argument("--train-studies", type=int, default=4)
    ap.add_argument("--train-warmup", type=int, default=2, help="untimed first iterations")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(SECTIONS))
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only on stderr")
    ap.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return ap


def print_report(rep: Dict[str, Any], out=sys.stdout):
    """The benchmark's tables on ``out``."""
    print(format_report(rep), file=out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from bmd_d2.errors import BMDError

    try:
        rep = run(args, io_benchmark=bench_io)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(rep)
    write_json(rep, args.output)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
