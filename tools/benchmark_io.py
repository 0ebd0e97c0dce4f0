#!/usr/bin/env python
"""Benchmark: bmd_d2's DICOM loader vs a plain ``pydicom.dcmread(f).pixel_array`` loop, in one run.

Writes a synthetic 300-slice 512×512 int16 CT series (realistic headers: ~100 elements, a private block with a 4 KiB
OB value, a sequence) into a temporary folder, then times (warm page cache; the candidates run in turn, ``--repeat``
rounds, and each figure is its best round, so background load hits all of them alike):

* raw read of the file bytes (lower bound),
* the plain pydicom loop ``[dcmread(f).pixel_array for f in files]`` (the issue's baseline),
* the same loop producing the same output (sorted by position, rescaled to HU float32, stacked),
* ``bmd_d2.data.dicom.load_series(dtype="auto")``: sorted, checked HU, returned as int16 because the series' rescale
  values are integers (the same numbers as float32, half the bytes),
* ``bmd_d2.data.dicom.load_series()`` with the default float32 output.

Both loader outputs are checked to be the same HU values as the same-output pydicom loop. The series writer and the
comparison are :mod:`bmd_d2.evaluation.io_speed` (shared with ``tools/benchmark.py``'s ``io`` section); this script
parses the options and prints the times.

Usage: ``python tools/benchmark_io.py [--slices 300] [--size 512] [--repeat 5] [--compressed]``
"""
import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bmd_d2.evaluation.io_speed import compare, raw_read, transfer_syntax_name, write_series  # noqa: E402

logger = logging.getLogger("benchmark_io")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compressed", action="store_true", help="RLE Lossless instead of uncompressed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        logger.info("writing %d slices of %d² ...", args.slices, args.size)
        write_series(tmp, args.slices, args.size, args.compressed)
        nbytes = raw_read(tmp)  # warms the page cache
        t, out, same = compare(tmp, args.repeat)
        if not all(same.values()):
            raise SystemExit(f"loaders disagree with the pydicom loop: dtype='auto' {same['auto']}, "
                             f"float32 {same['f32']}")
        logger.info("series: %d files, %.0f MB, %s; best of %d interleaved rounds, warm page cache", args.slices,
                    nbytes / 1e6, transfer_syntax_name(args.compressed), args.repeat)
        logger.info("raw read of the bytes                        : %6.3f s", t["raw"])
        logger.info("pydicom loop, .pixel_array only (baseline)   : %6.3f s", t["plain"])
        logger.info("pydicom loop + sort + HU float32 (same output): %6.3f s", t["loop"])
        for key, what in (("auto", "load_series(dtype='auto')"), ("f32", "load_series() default    ")):
            vol = out[key]
            logger.info("bmd_d2 %s → HU %-7s: %6.3f s  (%.1fx the plain loop, %.1fx the same-output loop; "
                        "%.1f MB; HU identical to the pydicom loop)", what, vol.data.dtype, t[key],
                        t["plain"] / t[key], t["loop"] / t[key], vol.data.nbytes / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
