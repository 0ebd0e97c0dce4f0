"""Series load speed: bmd_d2's DICOM loader against a plain ``pydicom.dcmread(f).pixel_array`` loop.

Behind ``tools/benchmark_io.py`` (which prints the comparison) and the ``io`` section of ``tools/benchmark.py``
(:func:`bench_io`, passed to :func:`bmd_d2.evaluation.benchmark_speed.run`). The candidates run in turn, once per
round, and each figure is its best round, so background load hits all of them alike; both loader outputs are checked
to be the same HU values as the same-output pydicom loop.
"""
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["write_series", "pydicom_plain", "pydicom_loop", "raw_read", "best_of_interleaved", "compare", "bench_io"]


def write_series(folder: str, n: int, size: int, compressed: bool = False) -> List[str]:
    """Write ``n`` slices of ``size``² int16 with realistic headers (~100 elements, a private block with a 4 KiB OB
    value, a sequence) into ``folder``.

    Args:
        folder: existing output folder.
        n: number of slices.
        size: rows and columns.
        compressed: RLE Lossless instead of Explicit VR Little Endian.

    Returns:
        the paths written.
    """
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


def pydicom_plain(folder: str) -> List[np.ndarray]:
    """The issue's baseline: ``[dcmread(f).pixel_array for f in files]`` (stored values, unsorted, no HU)."""
    import pydicom

    return [pydicom.dcmread(os.path.join(folder, f)).pixel_array for f in os.listdir(folder)]


def pydicom_loop(folder: str) -> np.ndarray:
    """The same output as bmd_d2: pydicom loop + sort by z + rescale to HU float32 + stack, ``(K, H, W)``."""
    import pydicom

    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices])


def raw_read(folder: str) -> int:
    """Read every file's bytes (the lower bound; also warms the page cache); returns the total byte count."""
    total = 0
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "rb") as fh:
            total += len(fh.read())
    return total


def best_of_interleaved(fns: Dict[str, Callable[[], Any]], repeat: int) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Run every function of ``fns`` (name → callable) once per round for ``repeat`` rounds.

    Returns:
        (name → best time s, name → last output); the output of ``plain`` is dropped (None) to free its slices.
    """
    times: Dict[str, List[float]] = {k: [] for k in fns}
    outs: Dict[str, Any] = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
            outs[k] = outs[k] if k != "plain" else None  # drop the 300 slice arrays between runs
    return {k: min(v) for k, v in times.items()}, outs


def compare(folder: str, repeat: int) -> Tuple[Dict[str, float], Dict[str, Any], Dict[str, bool]]:
    """The issue's comparison, as both benchmark scripts print it: every candidate once per round, ``repeat``
    rounds, each figure its best round.

    Returns:
        (name → best time s, name → last output, name → whether that loader's HU equal the same-output pydicom
        loop's) for ``raw``, ``plain``, ``loop``, ``auto`` (load_series with dtype="auto"), ``f32`` (load_series
        default).
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


def transfer_syntax_name(compressed: bool) -> str:
    """The transfer syntax :func:`write_series` uses, as the reports name it."""
    return "RLE Lossless" if compressed else "Explicit VR Little Endian"


def bench_io(slices: int, size: int, repeat: int, compressed: bool = False) -> Dict[str, Any]:
    """The ``io`` section of the speed benchmark: a synthetic series written to a temporary folder, then
    :func:`compare` (warm page cache).

    Returns:
        the section's report: sizes, the best time of each candidate (s), speed-ups and whether the HU are identical.
    """
    with tempfile.TemporaryDirectory(prefix="bmd_bench_io_") as tmp:
        write_series(tmp, slices, size, compressed)
        nbytes = raw_read(tmp)  # warm the page cache
        t, out, same = compare(tmp, repeat)
    return {"slices": slices, "size": size, "megabytes": round(nbytes / 1e6, 1),
            "transfer_syntax": transfer_syntax_name(compressed), "repeat": repeat,
            "raw_read_s": t["raw"], "pydicom_pixel_array_loop_s": t["plain"], "pydicom_loop_same_output_s": t["loop"],
            "bmd_d2_load_series_s": t["f32"], "speedup_vs_plain_loop": t["plain"] / t["f32"],
            "speedup_vs_same_output_loop": t["loop"] / t["f32"], "bmd_d2_load_series_auto_s": t["auto"],
            "auto_dtype": str(out["auto"].data.dtype), "speedup_auto_vs_plain_loop": t["plain"] / t["auto"],
            "identical_hu": all(same.values())}
