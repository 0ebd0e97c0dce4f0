"""Stored frames → HU slices of the output volume: output type (float32 / exact int16), rescale, threads.

The stored values come from :mod:`bmd_d2.data.dicom.reader` (read straight into the output slice where the file is
uncompressed, else decoded); the frames are the series module's checked, sorted slices.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Sequence, Tuple

import numpy as np

from ...errors import BMDError
from ...utils.threads import cpu_threads
from .reader import decode_frame, read_frame_into, reads_direct, stored_dtype
from .volume import INT16_MAX, INT16_MIN


class NotExact(Exception):
    """The HU of a slice do not fit int16 (raised only while filling an int16 volume)."""


def check_dtype_arg(dtype) -> str:
    """``dtype`` argument → "auto", "float32" or "int16"."""
    if isinstance(dtype, str) and dtype == "auto":
        return "auto"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt == np.float32:
        return "float32"
    if dt == np.int16:
        return "int16"
    raise ValueError(f"dtype must be 'auto', 'float32' or 'int16', got {dtype!r}")


def resolve_output_dtype(frames: Sequence, dtype: str, resampled: bool, source: str) -> np.dtype:
    """float32, or int16 when asked for and every HU value is an integer (integer slope and intercept, no resampling).

    "auto" still falls back to float32 while reading when a slice's HU exceed the int16 range (``NotExact``).
    """
    if dtype == "float32":
        return np.dtype(np.float32)
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    if integral and not resampled:
        return np.dtype(np.int16)
    if dtype == "int16":
        why = "non-integer RescaleSlope/RescaleIntercept" if not integral else "slices resampled onto a uniform grid"
        raise BMDError(f"HU cannot be stored exactly as int16 ({why}); use dtype='auto' or 'float32'", path=source)
    return np.dtype(np.float32)


def _stored_bounds(h: dict) -> Tuple[int, int]:
    """Smallest and largest stored value that BitsStored and PixelRepresentation allow."""
    bits = int(h.get("BitsAllocated") or 16)
    stored = min(int(h.get("BitsStored") or bits), bits)
    if int(h.get("PixelRepresentation") or 0) == 1:
        return -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    return 0, (1 << stored) - 1


def _store_float32(dst: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """``dst`` (float32) = float32(stored) * float32(slope) + float32(intercept), in one pass when the slope is 1.

    Bit-identical to ``stored.astype(np.float32) * slope + intercept`` (multiplying by 1 and adding 0 change nothing).
    """
    if slope != 1.0:
        np.multiply(stored, np.float32(slope), out=dst, dtype=np.float32, casting="unsafe")
        if intercept != 0.0:
            np.add(dst, np.float32(intercept), out=dst)
    elif intercept != 0.0:
        np.add(stored, np.float32(intercept), out=dst, dtype=np.float32, casting="unsafe")
    else:
        np.copyto(dst, stored, casting="unsafe")


def _store_int16(dst: np.ndarray, stored: np.ndarray, slope: int, intercept: int, bounds: Tuple[int, int],
                 in_place: bool) -> None:
    """``dst`` (int16) = ``stored`` * slope + intercept exactly; ``in_place``: ``stored`` is a view of ``dst``'s bytes.

    The arithmetic runs in int16 and wraps modulo 2**16, which gives the exact result whenever the final value fits
    int16. That is checked first against ``bounds`` (what the stored format allows) and, only where those could
    overflow, against the slice's actual minimum/maximum.

    Raises:
        NotExact: some HU of this slice lie outside the int16 range.
    """
    lo, hi = bounds
    if lo * slope + intercept < INT16_MIN and int(stored.min()) * slope + intercept < INT16_MIN:
        raise NotExact
    if hi * slope + intercept > INT16_MAX and int(stored.max()) * slope + intercept > INT16_MAX:
        raise NotExact
    if not in_place:
        np.copyto(dst, stored, casting="unsafe")  # wraps modulo 2**16 like the int16 arithmetic below
    if slope != 1:
        np.multiply(dst, np.int16(slope), out=dst)
    if intercept != 0:
        np.add(dst, np.int16((intercept + 32768) % 65536 - 32768), out=dst)


def read_pixels(frames: Sequence, pixels: Dict[int, np.ndarray], rows: int, cols: int, out_dtype: np.dtype,
                 workers: int) -> np.ndarray:
    """HU volume ``(K, rows, cols)`` of ``out_dtype`` (float32 or int16) from the frames in slice order.

    Uncompressed little-endian pixel bytes are read (``os.preadv``) at their offset: for int16 output from 16-bit
    storage straight into the output slice (then rescaled in place), otherwise into a per-thread slice buffer converted
    while it is still in cache. Other frames come from ``pixels`` (multi-frame) or are decoded by pydicom. Slices are
    shared out to a few threads (file reads and numpy release the GIL). ``frames``: the series' checked frames in
    slice order (``path``, ``frame`` index or None, ``header``, ``slope``, ``intercept``).
    """
    K = len(frames)
    hu = np.empty((K, rows, cols), dtype=out_dtype)
    as_int16 = out_dtype == np.int16
    slopes = [int(f.slope) if as_int16 else f.slope for f in frames]
    inters = [int(f.intercept) if as_int16 else f.intercept for f in frames]
    raw_ok = all(f.frame is None and reads_direct(f.header) for f in frames)
    formats = {(stored_dtype(f.header), f.header.get("BitsStored")) for f in frames}

    if raw_ok and len(formats) == 1:
        raw_dtype = stored_dtype(frames[0].header)
        bounds = _stored_bounds(frames[0].header)
        if as_int16 and raw_dtype.itemsize == 2:
            def one(k):
                view = hu[k].view(raw_dtype)  # the stored values land in the output slice itself
                read_frame_into(frames[k].header, view)
                _store_int16(hu[k], view, slopes[k], inters[k], bounds, in_place=True)
        else:
            local = threading.local()

            def one(k):
                buf = getattr(local, "buf", None)
                if buf is None:
                    buf = local.buf = np.empty((rows, cols), dtype=raw_dtype)
                read_frame_into(frames[k].header, buf)
                if as_int16:
                    _store_int16(hu[k], buf, slopes[k], inters[k], bounds, in_place=False)
                else:
                    _store_float32(hu[k], buf, slopes[k], inters[k])
    else:
        def one(k):
            fr = frames[k]
            arr = pixels[id(fr)] if id(fr) in pixels else decode_frame(fr.header)
            if arr.shape != (rows, cols):
                raise BMDError(f"pixel array {arr.shape} does not match Rows/Columns {(rows, cols)}", path=fr.path)
            if not as_int16:
                _store_float32(hu[k], arr, slopes[k], inters[k])
            elif arr.dtype.kind in "iu":
                info = np.iinfo(arr.dtype)
                _store_int16(hu[k], arr, slopes[k], inters[k], (int(info.min), int(info.max)), in_place=False)
            else:
                raise NotExact

    _run_in_chunks(one, K, workers)
    return hu


def _run_in_chunks(one, n: int, workers: int) -> None:
    """Call ``one(k)`` for k in 0..n-1 on up to ``workers`` threads (no more than :func:`cpu_threads` allows: the usable
    cores, capped by ``OMP_NUM_THREADS``), each thread taking
    one contiguous run of k: one task per thread keeps the pool's per-call overhead and GIL hand-offs out of the
    per-slice work. The first exception raised is re-raised."""
    threads = max(1, min(cpu_threads(workers), n))
    if threads == 1:
        for k in range(n):
            one(k)
        return
    edges = [n * i // threads for i in range(threads + 1)]

    def run(i):
        for k in range(edges[i], edges[i + 1]):
            one(k)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(run, range(threads)))

