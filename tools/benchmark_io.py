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

Both loader outputs are checked to be the same HU values as the same-output pydicom loop.

Usage: ``python tools/benchmark_io.py [--slices 300] [--size 512] [--repeat 5] [--compressed]``
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
logger = logging.getLogger("benchmark_io")


def write_series(folder, n, size, compressed=False):
    """Write ``n`` slices of ``size``² int16 with realistic headers; returns the paths."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (0.4 * size) ** 2
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID = "BENCH^SYNTHETIC", "BENCH0001"
        ds.Manufacturer, ds.KVP, ds.SeriesDescription = "bmd_d2 benchmark", "120", "bench"
        ds.InstanceNumber = n - k
        ds.ImagePositionPatient = [-250.0, -250.0, -600.0 + 1.25 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.SliceThickness = "1.25"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        for i in range(60):  # filler elements, like the many acquisition tags of real scanners
            ds.add_new(0x00190010 + i if i == 0 else 0x00191000 + i, "LO", f"value {i}" if i else "BMD_D2_BENCH")
        ds.add_new(0x00291010, "OB", bytes(4096))
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "123", "99SYN", "synthetic"
        ds.ProcedureCodeSequence = [item]
        img = np.where(body, 1064, 24).astype(np.int16) + rng.integers(-20, 20, (size, size), dtype=np.int16)
        ds.PixelData = img.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if compressed:
            ds.compress(RLELossless)
        p = os.path.join(folder, f"f{rng.integers(1e9):09d}.dcm")
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def pydicom_plain(folder):
    """The issue's baseline: ``[dcmread(f).pixel_array for f in files]`` (stored values, unsorted, no HU)."""
    import pydicom

    return [pydicom.dcmread(os.path.join(folder, f)).pixel_array for f in os.listdir(folder)]


def pydicom_loop(folder):
    """The same output as bmd_d2: pydicom loop + sort by z + rescale to HU float32 + stack."""
    import pydicom

    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices])


def raw_read(folder):
    total = 0
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "rb") as fh:
            total += len(fh.read())
    return total


def best_of_interleaved(fns, repeat):
    """Run every function of ``fns`` (name → callable) once per round for ``repeat`` rounds.

    Returns (name → best time s, name → last output).
    """
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
            outs[k] = outs[k] if k != "plain" else None  # drop the 300 slice arrays between runs
    return {k: min(v) for k, v in times.items()}, outs


def compare(folder, repeat):
    """The issue's comparison, as both benchmark scripts print it: every candidate once per round, ``repeat``
    rounds, each figure its best round.

    Returns (name → best time s, name → last output, name → whether that loader's HU equal the same-output pydicom
    loop's) for ``raw``, ``plain``, ``loop``, ``auto`` (load_series with dtype="auto"), ``f32`` (load_series default).
    """
    from bmd_d2.data.dicom import load_series

    t, out = best_of_interleaved({
        "raw": lambda: raw_read(folder),
        "plain": lambda: pydicom_plain(folder),
        "loop": lambda: pydicom_loop(folder),
        "auto": lambda: load_series(folder, dtype="auto"),
        "f32": lambda: load_series(folder),
    }, repeat)
    ref, auto, f32 = out["loop"], out["auto"].data, out["f32"].data
    same = {"auto": auto.shape == ref.shape and bool(np.array_equal(auto, ref)),
            "f32": f32.dtype == ref.dtype and bool(np.array_equal(f32, ref))}
    return t, out, same


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
                    nbytes / 1e6, "RLE Lossless" if args.compressed else "Explicit VR Little Endian", args.repeat)
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
