"""CT series ingestion: DICOM (folder, file list or one multi-frame file) or NIfTI → HU ``Volume`` with its geometry.

This module imports no detectron2. Everything a user can get wrong raises :class:`bmd_d2.errors.BMDError` with a one-line
message naming the file or series; everything that is odd but still measurable is reported in ``Volume.warnings``.

Rules (documented contract):

* **Discovery.** A folder is searched recursively; files that are not DICOM (README, DICOMDIR, zero-byte, truncated
  headers) and DICOM objects without pixel data are skipped and counted in the warnings.
* **Grouping.** Images are grouped by SeriesInstanceUID. Localizers (``ImageType`` contains ``LOCALIZER``) and non-CT
  objects are never chosen. When several CT series remain, the one with the most slices is chosen and the others are
  listed in the warnings; if two series tie for most slices the choice is ambiguous and a ``BMDError`` lists them.
  Pass ``series_uid=`` (config ``INPUT.DICOM.SERIES_UID``) to choose explicitly; :func:`list_series` lists them.
* **Sorting.** Slices are ordered by ImagePositionPatient projected on the slice normal (row × column direction of
  ImageOrientationPatient), never by file name or InstanceNumber.
* **Missing, empty or malformed attributes.** Geometry (ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing, Rows, Columns), the stored format (TransferSyntaxUID, BitsAllocated, PixelRepresentation) and Pixel
  Data are required: an error names the file and the attribute; so does any malformed value of these or of the
  rescale (never silently read as missing). Assumed with a warning: SamplesPerPixel 1, PhotometricInterpretation
  MONOCHROME2, BitsStored = BitsAllocated, RescaleSlope 1, RescaleIntercept 0, and Modality CT when the SOP Class
  (or the file meta's Media Storage SOP Class) is a CT Image Storage class. Identifiers and acquisition facts are
  optional (an empty or missing SeriesInstanceUID stays "" in ``Volume.meta``; such files form one series).
  Uncompressed Pixel Data a row or more longer than Rows × Columns needs is an error (wrong geometry); damaged
  bytes the fast walker cannot account for (unknown or unexpected VRs) go to pydicom, whose reading is the rule.
* **HU.** Every slice gets its own RescaleSlope/RescaleIntercept (missing → 1/0 with a warning); signed/unsigned
  storage and BitsStored < BitsAllocated are honoured. The HU array is float32 by default; ``dtype="auto"`` returns
  int16 when that holds the same numbers (integer slope and intercept on every slice, no resampling, values within
  -32768..32767), else float32.
* **Geometry checks.** Inconsistent orientation, pixel spacing or matrix size inside the chosen series → error.
  Duplicate positions → duplicates dropped (warning). Uneven spacing or missing slices → resampled linearly onto a
  uniform grid at the median spacing (warning). Gantry tilt → the slice step vector is kept in the affine (a sheared
  but exact grid; warning). Non-axial or oblique orientation → kept exactly in the affine (warning).

Speed: headers are parsed by a minimal element walker on the first bytes of each file (as many as the previous file's
header needed, at least 16 KiB; falling back to pydicom for anything unusual). Uncompressed little-endian pixel bytes
are read at the Pixel Data offset (``os.preadv``, no intermediate bytes object) by a few threads: with
``dtype="auto"`` (int16 HU when exact) straight into the preallocated output slice and rescaled there in place; for
float32 output into a per-thread slice buffer converted in one pass. Compressed frames are decoded with pydicom's
pixel handlers by the same threads. ``tools/benchmark_io.py`` compares this with a plain pydicom loop.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import BMDError

logger = logging.getLogger(__name__)
# pylibjpeg-openjpeg logs "tile number 1 / 1" at INFO for every JPEG 2000 slice it decodes; unless the user configured
# that logger, keep it to warnings so that a measurement's log is readable.
if logging.getLogger("openjpeg").level == logging.NOTSET:
    logging.getLogger("openjpeg").setLevel(logging.WARNING)

__all__ = [
    "Volume",
    "SeriesInfo",
    "find_dicom_files",
    "list_series",
    "load_series",
    "load_nifti",
    "load_volume",
]

PathLike = Union[str, os.PathLike]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_RAW_SYNTAXES = (_IMPLICIT_LE, _EXPLICIT_LE)
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")

_POS_TOL_MM = 0.01  # slices closer than this along the normal are duplicates
_SPACING_RTOL = 0.02  # relative deviation of a slice gap from the median that counts as uneven
_TILT_TOL_DEG = 0.1
_AXIAL_TOL_DEG = 30.0  # slice normal within this angle of the patient z axis counts as axial
_HAVE_PREADV = hasattr(os, "preadv")
_HEADER_CHUNK = 1 << 14  # first read of a file's header; grown to fit the previous file's header

# Tags read from every file: tag -> (keyword, kind). kind: s=string, m=multi-valued string, f=decimal list,
# i=integer string, u=unsigned short.
_TAGS: Dict[int, Tuple[str, str]] = {
    0x00020010: ("TransferSyntaxUID", "s"),
    0x00020002: ("MediaStorageSOPClassUID", "s"),
    0x00080005: ("SpecificCharacterSet", "m"),  # unused, but pydicom fails on a damaged one: so must the walker
    0x00080008: ("ImageType", "m"),
    0x00080016: ("SOPClassUID", "s"),
    0x00080018: ("SOPInstanceUID", "s"),
    0x00080060: ("Modality", "s"),
    0x00080070: ("Manufacturer", "s"),
    0x0008103E: ("SeriesDescription", "s"),
    0x00180050: ("SliceThickness", "f"),
    0x00180060: ("KVP", "f"),
    0x00181120: ("GantryDetectorTilt", "f"),
    0x00185100: ("PatientPosition", "s"),
    0x0020000D: ("StudyInstanceUID", "s"),
    0x0020000E: ("SeriesInstanceUID", "s"),
    0x00200011: ("SeriesNumber", "i"),
    0x00200013: ("InstanceNumber", "i"),
    0x00200032: ("ImagePositionPatient", "f"),
    0x00200037: ("ImageOrientationPatient", "f"),
    0x00200052: ("FrameOfReferenceUID", "s"),
    0x00280002: ("SamplesPerPixel", "u"),
    0x00280004: ("PhotometricInterpretation", "s"),
    0x00280008: ("NumberOfFrames", "i"),
    0x00280010: ("Rows", "u"),
    0x00280011: ("Columns", "u"),
    0x00280030: ("PixelSpacing", "f"),
    0x00280100: ("BitsAllocated", "u"),
    0x00280101: ("BitsStored", "u"),
    0x00280103: ("PixelRepresentation", "u"),
    0x00281052: ("RescaleIntercept", "f"),
    0x00281053: ("RescaleSlope", "f"),
    0x52009229: ("SharedFunctionalGroupsSequence", "q"),
    0x52009230: ("PerFrameFunctionalGroupsSequence", "q"),
}
# VRs the walker accepts for a wanted tag of each kind (explicit VR files): the standard's VR, or UN (the same value
# bytes, as written by some de-identification tools). Any other VR means damaged or unusual bytes: pydicom decides.
_KIND_VRS = {"s": {b"UI", b"CS", b"LO", b"SH", b"UN"}, "m": {b"CS", b"UN"}, "f": {b"DS", b"UN"}, "i": {b"IS", b"UN"},
             "u": {b"US", b"UN"}, "q": {b"SQ", b"UN"}}
_PIXEL_TAG = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# VRs with a 16-bit length; anything that is neither is not an explicit-VR element (damaged bytes): pydicom decides
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
              b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


# ----------------------------------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """A 3-D image on a regular grid in DICOM patient coordinates (LPS, mm).

    Attributes:
        data: array ``(K, J, I)`` = (slice, row, column): HU for CT (float32, or int16 when loaded with
            ``dtype="auto"``/``"int16"`` and every value is an exact integer), label values for label volumes.
        affine: float64 ``(4, 4)`` mapping voxel index ``(i, j, k, 1)`` (column, row, slice) to LPS ``(x, y, z, 1)`` mm.
        meta: identifiers and acquisition facts: ``StudyInstanceUID``, ``SeriesInstanceUID``, ``FrameOfReferenceUID``,
            ``SOPClassUID``, ``SOPInstanceUIDs`` (one per slice, in slice order), ``Modality``, ``KVP``,
            ``Manufacturer``, ``SeriesDescription``, ``source`` (path), ``files`` (per slice) ...
        warnings: one-line strings describing anything odd (uneven spacing, tilt, skipped files, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(K, J, I)`` voxel counts."""
        return tuple(self.data.shape)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size ``(dk, dj, di)`` in mm, array-axis order (length of the affine's columns)."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(n[2]), float(n[1]), float(n[0])

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of voxel (0, 0, 0), float64 ``(3,)``."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the i, j, k axes as columns, float64 ``(3, 3)``."""
        m = self.affine[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` in (i, j, k) order to LPS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map LPS points ``(..., 3)`` mm to continuous voxel indices ``(..., 3)`` in (i, j, k) order."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]


@dataclass
class SeriesInfo:
    """One series found under a source, as listed by :func:`list_series`."""

    series_uid: str
    modality: str
    description: str
    num_images: int
    is_localizer: bool
    matrix: Tuple[int, int]
    files: List[str]

    def __str__(self) -> str:
        loc = ", localizer" if self.is_localizer else ""
        return (f"{self.series_uid} ({self.modality}{loc}, {self.num_images} images, "
                f"{self.matrix[0]}x{self.matrix[1]}, '{self.description}')")


# ----------------------------------------------------------------------------------------------------------------------
# Header parsing
# ----------------------------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """The fast header walker cannot handle this file; use pydicom instead."""


class _NeedMore(Exception):
    """The header runs beyond the bytes read so far."""


# The walker reads a tag's 4 bytes as one little-endian word = (element << 16) | group.
_UNPACK_EXPLICIT = struct.Struct("<I2sH").unpack_from  # tag word, VR, 16-bit length
_UNPACK_IMPLICIT = struct.Struct("<II").unpack_from  # tag word, 32-bit length
_UNPACK_TAG_LEN = struct.Struct("<HHI").unpack_from  # group, element, 32-bit length (sequence items)
_UNPACK_U32 = struct.Struct("<I").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_TAGS_BY_WORD = {((t & 0xFFFF) << 16) | (t >> 16): v for t, v in _TAGS.items()}
_NO_TAGS: Dict[int, Tuple[str, str]] = {}


def _convert(raw: bytes, kind: str):
    """Value bytes → Python value of ``kind`` (see ``_TAGS``); unparsable numbers → None."""
    if kind == "u":
        return _UNPACK_U16(raw)[0] if len(raw) == 2 else None  # US of VM 1: exactly 2 bytes
    raw = raw.rstrip(b"\x00 ").lstrip(b" ")  # padding is trailing (NUL or space); leading spaces are allowed
    if kind == "s":
        return raw.decode("latin-1")
    if kind == "m":
        return [p.strip() for p in raw.decode("latin-1").split("\\")]
    if not raw:
        return None
    try:  # float() accepts ASCII bytes and surrounding whitespace
        if kind == "f":  # an empty component makes the whole value malformed (pydicom would read VM + 1 values)
            return [float(p) for p in raw.split(b"\\")]
        if kind == "i":
            return int(float(raw.split(b"\\")[0]))
    except ValueError:
        return None
    return raw.decode("latin-1")


def _store(out: dict, kw: str, kind: str, raw: bytes) -> None:
    """``out[kw]`` = the value of ``raw``; a value that does not convert is left out and kept, as text, in
    ``out["_malformed"]`` so that messages can tell a malformed value from a missing one."""
    value = _convert(raw, kind)
    if value is None and raw.rstrip(b"\x00 ").lstrip(b" "):
        out.setdefault("_malformed", {})[kw] = raw[:40].decode("latin-1")
        return
    out[kw] = value


def _skip_items(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; return the position after its delimiter."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise _NeedMore
        g, e, length = _UNPACK_TAG_LEN(buf, pos)
        tag = (g << 16) | e
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported("bad sequence item")
        if length == 0xFFFFFFFF:
            pos = _walk(buf, pos, explicit, None, nested=True)
        else:
            pos += length


def _walk(buf: bytes, pos: int, explicit: bool, out: Optional[dict], nested: bool = False) -> int:
    """Walk data elements from ``pos``; fill ``out`` with wanted tags; return the Pixel Data element position.

    In ``nested`` mode, walk one undefined-length item and return the position after its delimiter. This loop runs
    for every element of every file, so the common element costs one ``unpack`` and one dict lookup.
    """
    n = len(buf)
    wanted = _TAGS_BY_WORD if out is not None and not nested else _NO_TAGS
    long_vrs, short_vrs = _LONG_VRS, _SHORT_VRS
    while True:
        if pos + 8 > n:
            raise _NeedMore
        if explicit:
            word, vr, length = _UNPACK_EXPLICIT(buf, pos)
        else:
            word, length = _UNPACK_IMPLICIT(buf, pos)
            vr = None
        start = pos + 8
        if (word & 0xFFFF) >= 0x7FE0:  # Pixel Data group or item delimiters: rare, checked in full
            tag = ((word & 0xFFFF) << 16) | (word >> 16)
            if tag >> 16 == 0xFFFE:  # item delimiter (no VR even in explicit syntaxes)
                if nested and tag == _ITEM_END:
                    return start
                raise _Unsupported("unexpected delimiter")
            if not nested and tag >= _PIXEL_TAG:
                if tag == _PIXEL_TAG:
                    return pos
                raise _Unsupported("no pixel data")
        if vr in long_vrs:
            if pos + 12 > n:
                raise _NeedMore
            length = _UNPACK_U32(buf, start)[0]
            start = pos + 12
        elif explicit and vr not in short_vrs:
            raise _Unsupported("unknown VR")
        want = wanted.get(word)
        if want is not None and explicit and vr not in _KIND_VRS[want[1]]:
            raise _Unsupported("unexpected VR")
        if length == 0xFFFFFFFF:
            pos = _skip_items(buf, start, explicit and vr != b"UN")
            if want is not None and want[1] == "q":
                out[want[0]] = pos > start + 8  # more than the sequence delimiter: at least one item
            continue
        pos = start + length
        if want is not None:
            if pos > n:
                raise _NeedMore
            if want[1] == "q":
                out[want[0]] = length > 0
            else:
                _store(out, want[0], want[1], buf[start:pos])


def _fast_header(path: str, chunk: int = _HEADER_CHUNK) -> dict:
    """Parse the tags of ``_TAGS`` and the Pixel Data offset without pydicom, reading ``chunk`` bytes first.

    Raises:
        _Unsupported: anything but a Part-10 file in implicit/explicit little endian (or an encapsulated syntax).
    """
    with open(path, "rb") as f:
        buf = f.read(chunk)
        size = os.fstat(f.fileno()).st_size
        while True:
            try:
                return _parse_buffer(buf, size)
            except _NeedMore:
                if len(buf) >= size:
                    raise _Unsupported("truncated header")
                buf += f.read(max(len(buf), _HEADER_CHUNK))


def _parse_buffer(buf: bytes, size: int) -> dict:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unsupported("no preamble")
    h: dict = {}
    # File meta (group 0002): always explicit VR little endian.
    pos = 132
    n = len(buf)
    while pos + 8 <= n:
        g, e = struct.unpack_from("<HH", buf, pos)
        if g != 0x0002:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise _NeedMore
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            start = pos + 12
        elif vr in _SHORT_VRS:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            start = pos + 8
        else:
            raise _Unsupported("unknown VR in the file meta information")
        tag = (g << 16) | e
        if start + length > n:
            raise _NeedMore
        if tag in _TAGS:
            if vr not in _KIND_VRS[_TAGS[tag][1]]:
                raise _Unsupported("unexpected VR in the file meta information")
            _store(h, _TAGS[tag][0], _TAGS[tag][1], buf[start:start + length])
        pos = start + length
    ts = h.get("TransferSyntaxUID", "")
    if ts in (_DEFLATED_LE, _EXPLICIT_BE) or not ts:
        raise _Unsupported("transfer syntax")
    explicit = ts != _IMPLICIT_LE
    ppos = _walk(buf, pos, explicit, h)
    if ppos + 12 > n:
        raise _NeedMore
    if explicit:
        vr = buf[ppos + 4:ppos + 6]
        length = struct.unpack_from("<I", buf, ppos + 8)[0] if vr in _LONG_VRS else struct.unpack_from(
            "<H", buf, ppos + 6)[0]
        start = ppos + (12 if vr in _LONG_VRS else 8)
    else:
        length = struct.unpack_from("<I", buf, ppos + 4)[0]
        start = ppos + 8
    h["_pixel_offset"] = start
    h["_pixel_length"] = None if length == 0xFFFFFFFF else length
    h["_file_size"] = size
    h["_has_pixels"] = True
    return h


def _pydicom_header(path: str) -> dict:
    """Header via pydicom (fallback); same keys as :func:`_fast_header` (no pixel offset)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        h = _dataset_header(ds)  # values are converted on access: damaged ones raise here
        meta = getattr(ds, "file_meta", None)
        h["TransferSyntaxUID"] = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        h["MediaStorageSOPClassUID"] = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    except Exception as ex:  # pydicom raises many types on damaged files (InvalidDicomError, BytesLengthException, ...)
        raise BMDError(f"not a readable DICOM file ({type(ex).__name__})", path=path) from None
    h["_has_pixels"] = None  # unknown until decoded (stop_before_pixels drops it)
    h["_pixel_offset"] = None
    return h


def _dataset_header(ds) -> dict:
    h: dict = {}
    for kw, kind in _TAGS.values():
        if kw in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
            continue
        v = ds.get(kw, None)
        if v is None or v == "":
            continue
        if kind == "q":
            h[kw] = len(v) > 0  # an empty sequence holds no functional groups
        elif kind == "m":
            h[kw] = [str(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__")
                                       and not isinstance(v, str) else [v])]
        elif kind == "f":
            try:
                h[kw] = [float(x) for x in v] if hasattr(v, "__iter__") and not isinstance(v, str) else [float(v)]
            except (TypeError, ValueError):
                h.setdefault("_malformed", {})[kw] = str(v)[:40]
        elif kind in ("i", "u"):
            try:
                if kind == "u" and not isinstance(v, int):  # US read as text or several values: damaged
                    raise TypeError
                h[kw] = int(v)
            except (TypeError, ValueError):
                h.setdefault("_malformed", {})[kw] = str(v)[:40]
        else:
            h[kw] = str(v)
    if "PixelData" in ds or "FloatPixelData" in ds:
        h["_has_pixels"] = True
    return h


def _read_header(path: str, chunk: int = _HEADER_CHUNK) -> dict:
    try:
        h = _fast_header(path, chunk)
    except _Unsupported:
        h = _pydicom_header(path)
    except (OSError, struct.error) as ex:
        raise BMDError(f"cannot read file ({type(ex).__name__}: {ex})", path=path) from None
    h["_path"] = path
    return h


# ----------------------------------------------------------------------------------------------------------------------
# Discovery and grouping
# ----------------------------------------------------------------------------------------------------------------------
def find_dicom_files(source: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """Candidate files under ``source``: a folder (recursive, hidden files skipped), one file, or a list of files.

    Raises:
        BMDError: the path does not exist, cannot be read, or the folder holds no files.
    """
    if isinstance(source, (list, tuple)):
        files = [str(p) for p in source]
        for p in files:
            if not os.path.isfile(p):
                raise BMDError("file not found", path=p)
        if not files:
            raise BMDError("empty list of DICOM files")
        return files
    src = str(source)
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise BMDError("no such file or folder", path=src)
    if not os.access(src, os.R_OK | os.X_OK):
        raise BMDError("folder is not readable (permissions)", path=src)
    files: List[str] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    if not files:
        raise BMDError("folder holds no files", path=src)
    return files


def _scan(source) -> Tuple[List[dict], List[str]]:
    """Read the headers of every image file under ``source``. Returns (headers, skip notes)."""
    files = find_dicom_files(source)
    explicit_list = isinstance(source, (list, tuple)) or os.path.isfile(str(source))
    headers, skipped = [], []
    chunk = _HEADER_CHUNK
    for path in files:
        try:
            if os.path.getsize(path) == 0:
                raise BMDError("zero-byte file", path=path)
            if not os.access(path, os.R_OK):
                raise BMDError("file is not readable (permissions)", path=path)
            h = _read_header(path, chunk)
        except BMDError as ex:
            if explicit_list:
                raise
            skipped.append(str(ex))
            continue
        if h.get("_pixel_offset"):  # files of one series have headers of about the same size
            chunk = max(_HEADER_CHUNK, h["_pixel_offset"] + 4096)
        if h.get("MediaStorageSOPClassUID") == _DICOMDIR_CLASS:
            if explicit_list:
                raise BMDError("is a DICOMDIR (an index of a DICOM medium, no image); pass the folder that holds "
                               "the images", path=path)
            continue
        if not h.get("Rows") or not h.get("Columns"):
            why = ", ".join(f"{k} {_shown(h, k)}" for k in ("Rows", "Columns") if not h.get(k))
            if explicit_list:
                raise BMDError(f"DICOM object without an image ({why})", path=path)
            skipped.append(f"{path}: no image ({why})")
            continue
        if not h.get("Modality") and _sop_class(h) in _CT_CLASSES:
            h["Modality"] = "CT"  # the CT Image IODs require Modality CT; load_series says it was assumed
            h["_modality_assumed"] = True
        headers.append(h)
    if not headers:
        where = source if not isinstance(source, (list, tuple)) else f"{len(files)} files"
        detail = f" ({len(skipped)} skipped, e.g. {skipped[0]})" if skipped else ""
        raise BMDError(f"no DICOM images found{detail}", path=str(where))
    return headers, skipped


def _sop_class(h: dict) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID (de-identified exports sometimes empty the first)."""
    return h.get("SOPClassUID") or h.get("MediaStorageSOPClassUID") or ""


def _is_localizer(h: dict) -> bool:
    return any(t.upper() == "LOCALIZER" for t in (h.get("ImageType") or []))


_NO_SERIES_UID = "<no SeriesInstanceUID>"  # group key of the images without one (never put into Volume.meta)


def _group(headers: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for h in headers:
        groups.setdefault(h.get("SeriesInstanceUID") or _NO_SERIES_UID, []).append(h)
    return groups


def _info(uid: str, hs: List[dict]) -> SeriesInfo:
    h0 = hs[0]
    frames = sum(max(1, int(h.get("NumberOfFrames") or 1)) for h in hs)
    return SeriesInfo(series_uid=uid, modality=h0.get("Modality", "") or "no Modality",
                      description=h0.get("SeriesDescription", "") or "", num_images=frames,
                      is_localizer=all(_is_localizer(h) for h in hs),
                      matrix=(int(h0.get("Rows") or 0), int(h0.get("Columns") or 0)),
                      files=[h["_path"] for h in hs])


def list_series(source: Union[PathLike, Sequence[PathLike]]) -> List[SeriesInfo]:
    """List the image series under ``source`` (folder, file or list of files), largest first."""
    headers, _ = _scan(source)
    infos = [_info(uid, hs) for uid, hs in _group(headers).items()]
    return sorted(infos, key=lambda s: (-s.num_images, s.series_uid))


def _choose_series(groups: Dict[str, List[dict]], series_uid: Optional[str], source: str,
                   warnings: List[str]) -> Tuple[str, List[dict]]:
    infos = {uid: _info(uid, hs) for uid, hs in groups.items()}
    if series_uid:
        if series_uid not in groups:
            raise BMDError(f"series {series_uid} not found; available: "
                           + "; ".join(str(i) for i in infos.values()), path=source)
        return series_uid, groups[series_uid]
    ct = [i for i in infos.values() if i.modality == "CT" and not i.is_localizer]
    if not ct:
        mods = sorted({f"{i.modality}{' localizer' if i.is_localizer else ''}" for i in infos.values()})
        raise BMDError(f"no CT image series (found: {', '.join(mods)})", path=source)
    ct.sort(key=lambda i: -i.num_images)
    if len(ct) > 1:
        if ct[0].num_images == ct[1].num_images:
            tied = [str(i) for i in ct if i.num_images == ct[0].num_images]
            raise BMDError(f"{len(tied)} CT series with {ct[0].num_images} images each, choose one with series_uid "
                           f"(INPUT.DICOM.SERIES_UID): " + "; ".join(tied), path=source)
        warnings.append(f"{len(ct)} CT series found; using the one with the most images {ct[0].series_uid}; "
                        f"others: " + "; ".join(str(i) for i in ct[1:]))
    others = [i for i in infos.values() if i.modality != "CT" or i.is_localizer]
    if others:
        warnings.append("ignored non-CT/localizer series: " + "; ".join(str(i) for i in others))
    return ct[0].series_uid, groups[ct[0].series_uid]


# ----------------------------------------------------------------------------------------------------------------------
# Frames, geometry and pixels
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    path: str
    frame: Optional[int]  # index inside a multi-frame file, None for single-frame
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: Tuple[float, float]  # (row spacing, column spacing) mm
    slope: float
    intercept: float
    sop_uid: str
    header: dict


def _fg_value(item, seq_kw: str, kw: str):
    seq = item.get(seq_kw) if item is not None else None
    if seq and len(seq) and kw in seq[0]:
        return seq[0][kw].value
    return None


def _multiframe_frames(h: dict, warnings: List[str]) -> Tuple[List[_Frame], np.ndarray]:
    """Frames and stored pixels ``(F, R, C)`` of an (enhanced) multi-frame file via pydicom."""
    import pydicom

    path = h["_path"]
    try:
        ds = pydicom.dcmread(path)
        _apply_assumed(ds, h)
        pix = ds.pixel_array
    except Exception as ex:  # pydicom raises many types for broken pixel data
        raise BMDError(f"cannot decode multi-frame pixel data ({type(ex).__name__}: {ex})", path=path) from None
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    pix = pix.reshape((nf,) + pix.shape[-2:]) if pix.ndim >= 2 else pix
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) != nf:
        raise BMDError("multi-frame file without per-frame functional groups (ImagePositionPatient per frame)",
                       path=path)
    frames = []
    for f in range(nf):
        item = per[f]

        def get(seq_kw, kw, default=None):
            v = _fg_value(item, seq_kw, kw)
            if v is None:
                v = _fg_value(shared, seq_kw, kw)
            if v is None:
                v = ds.get(kw, None)
                v = v if v not in ("", None) else None
            return default if v is None else v

        ipp = get("PlanePositionSequence", "ImagePositionPatient")
        iop = get("PlaneOrientationSequence", "ImageOrientationPatient")
        ps = get("PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or ps is None:
            raise BMDError(f"frame {f + 1} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing", path=path)
        slope = get("PixelValueTransformationSequence", "RescaleSlope")
        intercept = get("PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None or intercept is None:
            if f == 0:
                warnings.append(f"{path}: no RescaleSlope/Intercept; stored values used as HU")
            slope, intercept = 1.0, 0.0
        _check_rescale(float(slope), float(intercept), path)
        thick = get("PixelMeasuresSequence", "SliceThickness")
        fh = dict(h)
        if thick is not None:
            fh["SliceThickness"] = [float(thick)]
        frames.append(_Frame(path=path, frame=f, ipp=np.array([float(v) for v in ipp]),
                             iop=np.array([float(v) for v in iop]),
                             pixel_spacing=(float(ps[0]), float(ps[1])), slope=float(slope),
                             intercept=float(intercept), sop_uid=h.get("SOPInstanceUID", ""), header=fh))
    return frames, pix


def _single_frame(h: dict, warnings_once: set) -> _Frame:
    path = h["_path"]
    ipp, iop = h.get("ImagePositionPatient"), h.get("ImageOrientationPatient")
    if not ipp or len(ipp) != 3 or not np.isfinite(ipp).all():
        raise BMDError(f"missing or malformed ImagePositionPatient ({_shown(h, 'ImagePositionPatient')}; need 3 "
                       f"numbers)", path=path)
    if not iop or len(iop) != 6 or not np.isfinite(iop).all() or min(np.linalg.norm(iop[:3]),
                                                                     np.linalg.norm(iop[3:])) < 0.5:
        raise BMDError(f"missing or malformed ImageOrientationPatient ({_shown(h, 'ImageOrientationPatient')}; "
                       f"need two unit vectors)", path=path)
    ps = h.get("PixelSpacing")
    if not ps or len(ps) != 2 or not np.isfinite(ps).all() or min(ps) <= 0:
        raise BMDError(f"missing or invalid PixelSpacing ({_shown(h, 'PixelSpacing')}; need 2 positive numbers)",
                       path=path)
    for kw in ("RescaleSlope", "RescaleIntercept"):
        if kw in (h.get("_malformed") or {}):
            raise BMDError(f"{kw} {_shown(h, kw)} is not a number", path=path)
        if len(h.get(kw) or ()) > 1:
            raise BMDError(f"{kw} has {len(h[kw])} values ({_shown(h, kw)}); it must have one", path=path)
    slope, intercept = h.get("RescaleSlope"), h.get("RescaleIntercept")
    if not slope or not intercept:
        if not slope and not intercept:
            warnings_once.add("RescaleSlope/RescaleIntercept missing or empty; stored values used as HU")
        elif not slope:
            warnings_once.add("RescaleSlope missing or empty; 1 assumed (HU = stored value + RescaleIntercept)")
        else:
            warnings_once.add("RescaleIntercept missing or empty; 0 assumed (HU = stored value x RescaleSlope)")
        slope, intercept = slope or [1.0], intercept or [0.0]
    _check_rescale(float(slope[0]), float(intercept[0]), path)
    if h.get("TransferSyntaxUID") in _RAW_SYNTAXES and h.get("_pixel_length") is not None:
        _check_pixel_length(h["_pixel_length"], h, warnings_once)
    return _Frame(path=path, frame=None, ipp=np.array(ipp, dtype=np.float64), iop=np.array(iop, dtype=np.float64),
                  pixel_spacing=(float(ps[0]), float(ps[1])), slope=float(slope[0]), intercept=float(intercept[0]),
                  sop_uid=h.get("SOPInstanceUID", ""), header=h)


_MAX_SLOPE = 100.0  # HU per stored unit; CT uses 1 (sometimes 0.5-2); anything near this is not a CT image
_MAX_INTERCEPT = 32768.0


def _check_pixel_length(length: int, h: dict, notes: Optional[set]) -> None:
    """Uncompressed single-frame Pixel Data longer than Rows × Columns × BitsAllocated/8 (+1 padding byte).

    A surplus of a whole row or more means Rows/Columns/BitsAllocated do not describe the stored image (the rows
    would be cut or sheared): an error. A smaller surplus is ignored, with a note (when ``notes`` is given). Too
    short pixel data is caught while reading.
    """
    bpp = int(h["BitsAllocated"]) // 8
    need = int(h["Rows"]) * int(h["Columns"]) * bpp
    extra = length - need
    if extra >= int(h["Columns"]) * bpp:
        raise BMDError(f"PixelData holds {length} bytes, {extra} more than Rows x Columns x BitsAllocated/8 = {need} "
                       f"(Rows {h['Rows']}, Columns {h['Columns']} or BitsAllocated {h['BitsAllocated']} wrong?)",
                       path=h["_path"])
    if extra > 1 and notes is not None:
        notes.add(f"PixelData longer than Rows x Columns need ({extra} surplus bytes ignored)")


def _check_rescale(slope: float, intercept: float, path: str) -> None:
    """Refuse rescale values that cannot give HU (zero/negative/huge/NaN slope, non-finite or absurd intercept)."""
    if not (np.isfinite(slope) and 0.0 < slope <= _MAX_SLOPE):
        raise BMDError(f"implausible RescaleSlope {slope:g} (expected 0 < slope <= {_MAX_SLOPE:g})", path=path)
    if not (np.isfinite(intercept) and abs(intercept) <= _MAX_INTERCEPT):
        raise BMDError(f"implausible RescaleIntercept {intercept:g}", path=path)


def _shown(h: dict, kw: str) -> str:
    """How a header value reads in a message: its value (shortened), "malformed '<text>'" or "missing or empty"."""
    bad = (h.get("_malformed") or {}).get(kw)
    if bad is not None:
        return f"malformed {bad!r}"
    value = h.get(kw)
    if value is None or (isinstance(value, (list, str)) and not value):
        return "missing or empty"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Image Pixel attributes a CT file may lack with one safe reading: keyword -> (assumed value, why it is safe);
# the value replaces the missing one in the header and, for pydicom's decoders, in the dataset (_apply_assumed).
_PIXEL_DEFAULTS = {
    "SamplesPerPixel": (1, "1 assumed (grey-scale)"),
    "PhotometricInterpretation": ("MONOCHROME2", "MONOCHROME2 assumed (HU come from the rescale either way)"),
}


def _check_image_format(h: dict, notes: set) -> None:
    """Refuse what cannot be read as one grey-scale CT image; fill in safe defaults for missing pixel attributes.

    A missing TransferSyntaxUID, BitsAllocated or PixelRepresentation is an error (a guess could give wrong HU);
    a missing SamplesPerPixel, PhotometricInterpretation or BitsStored (= BitsAllocated: no masking) is assumed and
    noted in ``notes`` (one warning per kind).
    """
    path = h["_path"]
    if not h.get("TransferSyntaxUID"):
        raise BMDError("TransferSyntaxUID missing or empty in the file meta information (the pixel data cannot be "
                       "decoded without it)", path=path)
    malformed = h.get("_malformed") or {}
    for kw in ("BitsAllocated", "PixelRepresentation", "BitsStored", "SamplesPerPixel"):
        required = kw in ("BitsAllocated", "PixelRepresentation")  # the other two have a default when missing
        if h.get(kw) is None and (required or kw in malformed):
            raise BMDError(f"{kw} {_shown(h, kw)} (the stored pixel format is unknown)", path=path)
    assumed = dict(h.get("_assumed") or {})
    for kw, (value, why) in _PIXEL_DEFAULTS.items():
        if h.get(kw) in (None, ""):
            assumed[kw] = value
            notes.add(f"{kw} missing or empty; {why}")
    bits = int(h["BitsAllocated"])
    if bits not in (8, 16, 32):
        raise BMDError(f"unsupported BitsAllocated={bits}", path=path)
    if h["PixelRepresentation"] not in (0, 1):
        raise BMDError(f"invalid PixelRepresentation={h['PixelRepresentation']} (0 unsigned or 1 signed)", path=path)
    stored = h.get("BitsStored")
    if stored is None:
        assumed["BitsStored"] = bits
        notes.add(f"BitsStored missing or empty; BitsAllocated ({bits}) assumed")
    elif not 1 <= stored <= bits:
        raise BMDError(f"invalid BitsStored={stored} (BitsAllocated={bits})", path=path)
    if assumed:
        h.update(assumed)
        h["_assumed"] = assumed
    spp = int(h["SamplesPerPixel"])
    photo = str(h["PhotometricInterpretation"]).upper()
    if spp != 1 or photo not in ("MONOCHROME1", "MONOCHROME2"):
        raise BMDError(f"not a grey-scale CT image (SamplesPerPixel={spp}, PhotometricInterpretation={photo})",
                       path=path)


def _apply_assumed(ds, h: dict) -> None:
    """Put the values :func:`_check_image_format` assumed for missing attributes into pydicom's dataset ``ds``, so
    that its pixel decoders read the same format as the header."""
    for kw, value in (h.get("_assumed") or {}).items():
        setattr(ds, kw, value)


def _raw_dtype(h: dict) -> np.dtype:
    bits = int(h.get("BitsAllocated") or 16)
    signed = int(h.get("PixelRepresentation") or 0) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _fix_bits(raw: np.ndarray, h: dict) -> None:
    """In place: sign-extend / mask when BitsStored < BitsAllocated (e.g. 12-bit data in 16-bit words)."""
    bits = int(h.get("BitsAllocated") or 16)
    stored = int(h.get("BitsStored") or bits)
    if stored >= bits:
        return
    if raw.dtype.kind == "i":
        shift = bits - stored
        np.left_shift(raw, shift, out=raw)
        np.right_shift(raw, shift, out=raw)
    else:
        np.bitwise_and(raw, raw.dtype.type((1 << stored) - 1), out=raw)


def _read_raw_into(fr: _Frame, dst: np.ndarray) -> None:
    """Read uncompressed little-endian pixel bytes of one single-frame file into ``dst`` (R, C) in place."""
    h = fr.header
    need = dst.nbytes
    length = h.get("_pixel_length")
    if length is None:  # undefined length: encapsulated, impossible in an uncompressed transfer syntax
        raise BMDError(f"PixelData has an undefined length in the uncompressed transfer syntax "
                       f"{h.get('TransferSyntaxUID')}", path=fr.path)
    if length < need:
        raise BMDError(f"pixel data too short (PixelData holds {length} of {need} bytes)", path=fr.path)
    view = memoryview(dst.reshape(-1)).cast("B")
    if _HAVE_PREADV:  # one open and one read syscall, no buffered-reader object
        fd = os.open(fr.path, os.O_RDONLY)
        try:
            got = 0
            while got < need:
                r = os.preadv(fd, [view[got:]], h["_pixel_offset"] + got)
                if r <= 0:
                    break
                got += r
        finally:
            os.close(fd)
    else:
        with open(fr.path, "rb") as f:
            f.seek(h["_pixel_offset"])
            got = f.readinto(view)
    if got != need:
        raise BMDError(f"truncated pixel data (PixelData: {got} of {need} bytes in the file)", path=fr.path)
    if dst.dtype.byteorder == ">":
        dst.byteswap(inplace=True)
    _fix_bits(dst, h)


_JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
# (folder, transfer syntax, pixel representation, bits stored) -> whether CharLS' direct decode gave exactly
# pydicom's stored values on the first slice decoded with that key (checked once, then trusted or avoided)
_JPEG_LS_CHECKED: Dict[tuple, bool] = {}


def _jpeg_ls_key(fr: _Frame) -> Optional[tuple]:
    """The :data:`_JPEG_LS_CHECKED` key of a single-frame 16-bit greyscale JPEG-LS slice; None for anything else."""
    h = fr.header
    ts = h.get("TransferSyntaxUID", "")
    if ts not in _JPEG_LS or fr.frame is not None or h.get("_pixel_offset") is None or \
            int(h.get("SamplesPerPixel") or 1) != 1 or int(h.get("BitsAllocated") or 0) != 16:
        return None
    return os.path.dirname(fr.path), ts, int(h.get("PixelRepresentation") or 0), int(h.get("BitsStored") or 16)


def _jpeg_ls_direct(fr: _Frame) -> Optional[np.ndarray]:
    """Stored values of a JPEG-LS slice (see :func:`_jpeg_ls_key`) decoded by CharLS (``pyjpegls``) from the file's
    fragments at the header's pixel offset: no pydicom dataset, ~4x faster than pydicom's handler. Signed data are
    sign-extended from BitsStored, as pydicom does. None on any problem (the caller then uses pydicom)."""
    h = fr.header
    try:
        import jpeg_ls
        from pydicom.encaps import generate_frames

        with open(fr.path, "rb") as f:
            f.seek(h["_pixel_offset"])
            frame = next(generate_frames(f.read(), number_of_frames=1))
        arr = jpeg_ls.decode(np.frombuffer(frame, np.uint8))
    except Exception:  # missing codec, malformed fragments, decoder error: pydicom decides and reports
        return None
    if arr.shape != (int(h.get("Rows") or 0), int(h.get("Columns") or 0)):
        return None
    bits = int(h.get("BitsStored") or 16)
    if int(h.get("PixelRepresentation") or 0) == 1:
        a = arr.astype(np.int32) & ((1 << bits) - 1)
        a[a >= (1 << (bits - 1))] -= 1 << bits
        return a.astype(np.int16)
    return arr.astype(np.uint16, copy=False)


def _pixel_data_empty(ds) -> bool:
    """Whether the dataset's Pixel Data holds no bytes, or (encapsulated) nothing after its Basic Offset Table."""
    value = ds.PixelData
    if not value:
        return True
    if len(value) >= 8 and value[:4] == b"\xfe\xff\x00\xe0":  # encapsulated: items, the first is the offset table
        return len(value) < 8 + _UNPACK_U32(value, 4)[0] + 8  # no room for a fragment item after the table
    return False


def _decode_pydicom(fr: _Frame) -> np.ndarray:
    """Decode one single-frame file's pixels (stored values, any transfer syntax) with pydicom's handlers; JPEG-LS
    with CharLS directly once the first slice of its folder and format decoded identically both ways."""
    import pydicom

    key = _jpeg_ls_key(fr)
    direct = None
    if key is not None and _JPEG_LS_CHECKED.get(key) is not False:
        direct = _jpeg_ls_direct(fr)
        if direct is not None and _JPEG_LS_CHECKED.get(key):
            return direct
    try:
        ds = pydicom.dcmread(fr.path)
        if "PixelData" not in ds:
            raise BMDError("no PixelData element (no image)", path=fr.path)
        if _pixel_data_empty(ds):
            raise BMDError("PixelData is empty (no encoded frame)", path=fr.path)
        _apply_assumed(ds, fr.header)
        if fr.header.get("TransferSyntaxUID") in _RAW_SYNTAXES and fr.frame is None:
            _check_pixel_length(len(ds.PixelData), fr.header, None)
        arr = ds.pixel_array
    except BMDError:
        raise
    except Exception as ex:  # decoder errors come in many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?") if "ds" in locals() else "?"
        raise BMDError(f"cannot decode pixel data (transfer syntax {ts}: {type(ex).__name__}: {ex})",
                       path=fr.path) from None
    if key is not None and key not in _JPEG_LS_CHECKED:
        _JPEG_LS_CHECKED[key] = direct is not None and direct.shape == arr.shape and np.array_equal(direct, arr)
    if arr.ndim != 2:
        raise BMDError(f"unexpected pixel array shape {arr.shape}", path=fr.path)
    return arr


_INT16_MIN, _INT16_MAX = -32768, 32767


class _NotExact(Exception):
    """The HU of a slice do not fit int16 (raised only while filling an int16 volume)."""


def _check_dtype_arg(dtype) -> str:
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


def _resolve_output_dtype(frames: List[_Frame], dtype: str, resampled: bool, source: str) -> np.dtype:
    """float32, or int16 when asked for and every HU value is an integer (integer slope and intercept, no resampling).

    "auto" still falls back to float32 while reading when a slice's HU exceed the int16 range (``_NotExact``).
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
        _NotExact: some HU of this slice lie outside the int16 range.
    """
    lo, hi = bounds
    if lo * slope + intercept < _INT16_MIN and int(stored.min()) * slope + intercept < _INT16_MIN:
        raise _NotExact
    if hi * slope + intercept > _INT16_MAX and int(stored.max()) * slope + intercept > _INT16_MAX:
        raise _NotExact
    if not in_place:
        np.copyto(dst, stored, casting="unsafe")  # wraps modulo 2**16 like the int16 arithmetic below
    if slope != 1:
        np.multiply(dst, np.int16(slope), out=dst)
    if intercept != 0:
        np.add(dst, np.int16((intercept + 32768) % 65536 - 32768), out=dst)


def _read_pixels(frames: List[_Frame], pixels: Dict[int, np.ndarray], rows: int, cols: int, out_dtype: np.dtype,
                 workers: int) -> np.ndarray:
    """HU volume ``(K, rows, cols)`` of ``out_dtype`` (float32 or int16) from the frames in slice order.

    Uncompressed little-endian pixel bytes are read (``os.preadv``) at their offset: for int16 output from 16-bit
    storage straight into the output slice (then rescaled in place), otherwise into a per-thread slice buffer converted
    while it is still in cache. Other frames come from ``pixels`` (multi-frame) or are decoded by pydicom. Slices are
    shared out to a few threads (file reads and numpy release the GIL).
    """
    K = len(frames)
    hu = np.empty((K, rows, cols), dtype=out_dtype)
    as_int16 = out_dtype == np.int16
    slopes = [int(f.slope) if as_int16 else f.slope for f in frames]
    inters = [int(f.intercept) if as_int16 else f.intercept for f in frames]
    raw_ok = all(f.frame is None and f.header.get("TransferSyntaxUID") in _RAW_SYNTAXES
                 and f.header.get("_pixel_offset") is not None for f in frames)
    formats = {(_raw_dtype(f.header), f.header.get("BitsStored")) for f in frames}

    if raw_ok and len(formats) == 1:
        raw_dtype = _raw_dtype(frames[0].header)
        bounds = _stored_bounds(frames[0].header)
        if as_int16 and raw_dtype.itemsize == 2:
            def one(k):
                view = hu[k].view(raw_dtype)  # the stored values land in the output slice itself
                _read_raw_into(frames[k], view)
                _store_int16(hu[k], view, slopes[k], inters[k], bounds, in_place=True)
        else:
            local = threading.local()

            def one(k):
                buf = getattr(local, "buf", None)
                if buf is None:
                    buf = local.buf = np.empty((rows, cols), dtype=raw_dtype)
                _read_raw_into(frames[k], buf)
                if as_int16:
                    _store_int16(hu[k], buf, slopes[k], inters[k], bounds, in_place=False)
                else:
                    _store_float32(hu[k], buf, slopes[k], inters[k])
    else:
        def one(k):
            fr = frames[k]
            arr = pixels[id(fr)] if id(fr) in pixels else _decode_pydicom(fr)
            if arr.shape != (rows, cols):
                raise BMDError(f"pixel array {arr.shape} does not match Rows/Columns {(rows, cols)}", path=fr.path)
            if not as_int16:
                _store_float32(hu[k], arr, slopes[k], inters[k])
            elif arr.dtype.kind in "iu":
                info = np.iinfo(arr.dtype)
                _store_int16(hu[k], arr, slopes[k], inters[k], (int(info.min), int(info.max)), in_place=False)
            else:
                raise _NotExact

    _run_in_chunks(one, K, workers)
    return hu


def _run_in_chunks(one, n: int, workers: int) -> None:
    """Call ``one(k)`` for k in 0..n-1 on up to ``workers`` threads (no more than the usable cores), each thread taking
    one contiguous run of k: one task per thread keeps the pool's per-call overhead and GIL hand-offs out of the
    per-slice work. The first exception raised is re-raised."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    threads = max(1, min(workers, cores, n))
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


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def _assemble(frames: List[_Frame], pixels: Dict[int, np.ndarray], source: str, warnings: List[str],
              workers: int, dtype: str = "float32") -> Tuple[np.ndarray, np.ndarray, List[_Frame]]:
    """Check geometry, sort, read pixels, rescale → (HU (K, J, I), affine (4, 4), frames in order).

    ``dtype`` ("float32", "int16" or "auto") chooses the HU array type, see :func:`load_series`.
    """
    f0 = frames[0]
    rows, cols = int(f0.header.get("Rows")), int(f0.header.get("Columns"))
    sizes = {(int(f.header.get("Rows")), int(f.header.get("Columns"))) for f in frames}
    if len(sizes) > 1:
        raise BMDError(f"mixed matrix sizes in one series: {sorted(sizes)}", path=source)
    for f in frames:
        if np.abs(f.iop - f0.iop).max() > 1e-4:
            raise BMDError(f"inconsistent ImageOrientationPatient within the series ({f.path})", path=source)
        if abs(f.pixel_spacing[0] - f0.pixel_spacing[0]) > 1e-4 or abs(f.pixel_spacing[1] - f0.pixel_spacing[1]) > 1e-4:
            raise BMDError(f"inconsistent PixelSpacing within the series ({f.path})", path=source)
    r, c = f0.iop[:3] / np.linalg.norm(f0.iop[:3]), f0.iop[3:] / np.linalg.norm(f0.iop[3:])
    if abs(float(np.dot(r, c))) > 1e-3:
        raise BMDError("ImageOrientationPatient row/column directions are not orthogonal", path=source)
    n = _normal(f0.iop)
    s = np.array([float(np.dot(f.ipp, n)) for f in frames])
    order = np.argsort(s, kind="stable")
    frames = [frames[i] for i in order]
    s = s[order]
    # Duplicates
    keep = [0]
    dup_same = dup_diff = 0
    for i in range(1, len(frames)):
        if s[i] - s[keep[-1]] < _POS_TOL_MM:
            if frames[i].sop_uid and frames[i].sop_uid == frames[keep[-1]].sop_uid:
                dup_same += 1
            else:
                dup_diff += 1
            continue
        keep.append(i)
    if dup_same or dup_diff:
        warnings.append(f"duplicate slice positions: dropped {dup_same + dup_diff} slice(s) "
                        f"({dup_same} repeated SOPInstanceUID, {dup_diff} different images at the same position)")
        frames = [frames[i] for i in keep]
        s = s[keep]
    K = len(frames)
    # Orientation
    angle_axial = float(np.degrees(np.arccos(min(1.0, abs(n[2])))))
    if angle_axial > _AXIAL_TOL_DEG:
        plane = "sagittal" if abs(n[0]) >= abs(n[1]) else "coronal"
        warnings.append(f"non-axial acquisition ({plane}-like, slice normal {angle_axial:.0f} deg from the "
                        f"cranio-caudal axis); geometry kept exactly in the affine")
    elif angle_axial > 1.0:
        warnings.append(f"oblique axial slices (normal {angle_axial:.1f} deg from the cranio-caudal axis)")
    # Spacing, gaps, tilt
    affine = np.eye(4)
    affine[:3, 0] = r * f0.pixel_spacing[1]
    affine[:3, 1] = c * f0.pixel_spacing[0]
    affine[:3, 3] = frames[0].ipp
    resample_to = None
    if K >= 2:
        d = np.diff(s)
        dk = float(np.median(d))
        uneven = np.abs(d - dk) > _SPACING_RTOL * dk + 1e-3
        if uneven.any():
            ratio = d / dk
            missing = int(np.sum(np.maximum(np.round(ratio[ratio > 1.5]) - 1, 0)))
            desc = f"{missing} missing slice(s)" if missing else "uneven slice spacing"
            warnings.append(f"{desc}: gaps {d.min():.3g}..{d.max():.3g} mm (median {dk:.3g} mm); resampled linearly "
                            f"onto a uniform {dk:.3g} mm grid")
            resample_to = dk
        step = (frames[-1].ipp - frames[0].ipp) / (s[-1] - s[0]) * (dk if resample_to else (s[-1] - s[0]) / (K - 1))
        cosang = abs(float(np.dot(step, n))) / max(np.linalg.norm(step), 1e-9)
        tilt = float(np.degrees(np.arccos(min(1.0, cosang))))
        tag_tilt = (f0.header.get("GantryDetectorTilt") or [0.0])[0]
        if tilt > _TILT_TOL_DEG or abs(tag_tilt) > _TILT_TOL_DEG:
            warnings.append(f"gantry tilt {max(tilt, abs(tag_tilt)):.1f} deg; sheared slice geometry kept exactly in "
                            f"the affine")
        # Positions must lie on one line (else the series is not one stack)
        line = frames[0].ipp + np.outer((s - s[0]) / max(s[-1] - s[0], 1e-9), frames[-1].ipp - frames[0].ipp)
        if np.abs(line - np.array([f.ipp for f in frames])).max() > max(0.5, 0.25 * dk):
            raise BMDError("slice positions do not lie on one line (several stacks in one series?)", path=source)
        affine[:3, 2] = step
    else:
        thick = (f0.header.get("SliceThickness") or [1.0])[0] or 1.0
        affine[:3, 2] = n * float(thick)
        warnings.append("single-slice series")

    # Pixels
    out_dtype = _resolve_output_dtype(frames, dtype, resample_to is not None, source)
    try:
        hu = _read_pixels(frames, pixels, rows, cols, out_dtype, workers)
    except _NotExact:  # some HU lie outside -32768..32767
        if dtype == "int16":
            raise BMDError("HU cannot be stored exactly as int16 (values outside -32768..32767); use dtype='auto' or "
                           "'float32'", path=source) from None
        hu = _read_pixels(frames, pixels, rows, cols, np.dtype(np.float32), workers)

    if resample_to is not None:
        hu, frames_pos = _resample_uniform(hu, s, resample_to)
    return hu, affine, frames


def _resample_uniform(hu: np.ndarray, s: np.ndarray, dk: float):
    """Linear interpolation along k from positions ``s`` (K,) onto ``s[0] + m * dk``."""
    m = int(round((s[-1] - s[0]) / dk)) + 1
    t = s[0] + np.arange(m) * dk
    t = np.minimum(t, s[-1])
    idx = np.clip(np.searchsorted(s, t, side="right") - 1, 0, len(s) - 2)
    w = ((t - s[idx]) / (s[idx + 1] - s[idx])).astype(np.float32)
    out = np.empty((m,) + hu.shape[1:], dtype=np.float32)
    for q in range(m):
        a, b = hu[idx[q]], hu[idx[q] + 1]
        np.multiply(a, 1.0 - w[q], out=out[q])
        out[q] += w[q] * b
    return out, t


def load_series(source: Union[PathLike, Sequence[PathLike]], series_uid: Optional[str] = None, *,
                workers: int = 4, dtype: Union[str, type, np.dtype] = np.float32) -> Volume:
    """Load one CT series as an HU volume.

    Args:
        source: a folder (searched recursively), one DICOM file (single- or multi-frame), or a list of files.
        series_uid: SeriesInstanceUID to load; None applies the rule in the module docstring (most slices).
        workers: threads for reading/decoding pixel data.
        dtype: type of the HU array. ``float32`` (default): always. ``"auto"``: int16 when that holds every HU value
            exactly (every slice has an integer RescaleSlope and RescaleIntercept, no resampling, all values within
            -32768..32767), else float32; int16 halves the memory and loads faster, and the numbers are the same.
            ``"int16"``: like "auto" but a ``BMDError`` where int16 cannot be exact.

    Returns:
        Volume: ``data`` ``(K, J, I)`` HU (float32, or int16 as chosen by ``dtype``) sorted along the slice normal,
        ``affine`` (4, 4) index → LPS mm,
        ``meta`` identifiers (SOPInstanceUIDs in slice order), ``warnings``.

    Raises:
        BMDError: nothing loadable, non-CT modality, ambiguous series, inconsistent geometry, undecodable pixels.
    """
    dtype = _check_dtype_arg(dtype)
    src = str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} files"
    headers, skipped = _scan(source)
    warnings: List[str] = []
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable/non-image file(s), e.g. {skipped[0]}")
    uid, hs = _choose_series(_group(headers), series_uid, src, warnings)
    modality = hs[0].get("Modality", "")
    if modality != "CT":
        raise BMDError(f"series {uid} has modality {modality or 'unknown (no Modality)'}, not CT", path=src)
    assumed = [h for h in hs if h.get("_modality_assumed")]
    if assumed:
        warnings.append(f"Modality missing or empty in {len(assumed)} file(s) (e.g. {assumed[0]['_path']}); CT "
                        f"assumed from the SOP Class UID (CT Image Storage)")
    loc = [h for h in hs if _is_localizer(h)]
    if loc and len(loc) < len(hs):
        warnings.append(f"dropped {len(loc)} localizer image(s) from series {uid}")
        hs = [h for h in hs if not _is_localizer(h)]
    frames: List[_Frame] = []
    pixels: Dict[int, np.ndarray] = {}
    notes: set = set()
    for h in hs:
        _check_image_format(h, notes)
        if int(h.get("NumberOfFrames") or 1) > 1 or h.get("PerFrameFunctionalGroupsSequence"):
            fr, pix = _multiframe_frames(h, warnings)
            for i, f in enumerate(fr):
                pixels[id(f)] = pix[i]
            frames.extend(fr)
        else:
            frames.append(_single_frame(h, notes))
    warnings.extend(sorted(notes))
    if (hs[0].get("PhotometricInterpretation") or "").upper() == "MONOCHROME1":
        warnings.append("PhotometricInterpretation MONOCHROME1 (display inverted); HU from the rescale are unaffected")
    hu, affine, frames = _assemble(frames, pixels, src, warnings, workers, dtype)
    h0 = hs[0]
    meta = {
        "source": src,
        "StudyInstanceUID": h0.get("StudyInstanceUID", ""),
        "SeriesInstanceUID": "" if uid == _NO_SERIES_UID else uid,
        "FrameOfReferenceUID": h0.get("FrameOfReferenceUID", ""),
        "SOPClassUID": h0.get("SOPClassUID", ""),
        "SOPInstanceUIDs": [f.sop_uid for f in frames],
        "files": [f.path for f in frames],
        "Modality": modality,
        "KVP": (h0.get("KVP") or [None])[0],
        "Manufacturer": h0.get("Manufacturer", ""),
        "SeriesDescription": h0.get("SeriesDescription", ""),
        "SeriesNumber": h0.get("SeriesNumber"),
        "SliceThickness": (h0.get("SliceThickness") or [None])[0],
        "PatientPosition": h0.get("PatientPosition", ""),
        "TransferSyntaxUID": h0.get("TransferSyntaxUID", ""),
    }
    if hu.shape[0] != len(frames):
        meta["SOPInstanceUIDs_note"] = "slices were resampled; SOPInstanceUIDs are the source slices in order"
    for w in warnings:
        logger.warning("%s: %s", uid, w)
    return Volume(data=hu, affine=affine, meta=meta, warnings=warnings)


# ----------------------------------------------------------------------------------------------------------------------
# NIfTI and dispatch
# ----------------------------------------------------------------------------------------------------------------------
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_nifti(path: PathLike, dtype=np.float32) -> Volume:
    """Load a NIfTI volume (.nii / .nii.gz) in the ``Volume`` convention.

    NIfTI's RAS world coordinates are converted to LPS (x and y negated); the array is transposed from nibabel's
    ``(i, j, k)`` to ``(K, J, I)``, so NIfTI axis 0 is the column index ``i``. Values are cast to ``dtype``
    (float32 by default; e.g. ``np.int16`` for label volumes; ``"auto"``: int16 when the scaled values are integers
    stored in at most 16 bits that fit int16, else float32). Scaling (scl_slope/inter) is applied.

    Raises:
        BMDError: missing/unreadable file or not a 3-D image.
    """
    import nibabel as nib

    path = str(path)
    if not os.path.isfile(path):
        raise BMDError("no such NIfTI file", path=path)
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as ex:  # nibabel raises several types for broken files
        raise BMDError(f"cannot read NIfTI ({type(ex).__name__}: {ex})", path=path) from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise BMDError(f"expected a 3-D volume, got shape {arr.shape}", path=path)
    if isinstance(dtype, str) and dtype == "auto":
        fits = arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.dtype != np.uint16
        dtype = np.int16 if fits or (arr.dtype == np.uint16 and (arr.size == 0 or int(arr.max()) <= _INT16_MAX)) \
            else np.float32
    data = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)), dtype=dtype)
    affine = _RAS_TO_LPS @ img.affine.astype(np.float64)
    return Volume(data=data, affine=affine, meta={"source": path, "format": "nifti"}, warnings=[])


def load_volume(source: Union[PathLike, Sequence[PathLike]], series_uid: Optional[str] = None, **kwargs) -> Volume:
    """Load a CT volume from a NIfTI file (``.nii``/``.nii.gz``) or DICOM (anything else); see :func:`load_series`.

    ``dtype`` ("auto", float32, int16) applies to both; other keyword arguments go to :func:`load_series`.
    """
    if not isinstance(source, (list, tuple)) and str(source).lower().endswith((".nii", ".nii.gz")):
        return load_nifti(source, dtype=kwargs.get("dtype", np.float32))
    return load_series(source, series_uid=series_uid, **kwargs)
