"""DICOM file reader: one file's header and its stored pixel values, fast where possible, pydicom otherwise.

The series rules (:mod:`bmd_d2.data.dicom.series`) use only this small interface:

* :func:`read_header` ``(path) -> header``: a dict of the attributes in :data:`TAGS` (keyword → value; ``s`` text,
  ``m`` list of text, ``f`` list of floats, ``i``/``u`` int, ``q`` whether the sequence has items), values that do not
  convert kept as text in ``header["_malformed"]``, and private keys: ``_path``, ``_has_pixels``, ``_pixel_offset`` /
  ``_pixel_length`` (where the Pixel Data value lies; None when pydicom read the header) and ``_source`` (a
  :class:`SourceHeader`: the whole header kept for the DICOM writers).
* :func:`read_frame_into` ``(header, dst)``: the stored values of an uncompressed single-frame file read straight into
  an array (when :func:`reads_direct` says so); :func:`decode_frame` ``(header)``: any other single-frame file;
  :func:`read_multiframe` ``(header)``: the frames and per-frame values of a multi-frame file.

Fast path: a minimal element walker on the first bytes of the file (as many as the caller's ``chunk``), raw
little-endian pixel bytes read at their offset (``os.preadv``), JPEG-LS decoded by CharLS directly once it agreed with
pydicom on the first slice of a folder. Anything the walker does not account for (other transfer syntaxes, unknown or
unexpected VRs, damaged items, truncated headers) goes to pydicom, whose reading is the rule.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...errors import BMDError

logger = logging.getLogger(__name__)
# pylibjpeg-openjpeg logs "tile number 1 / 1" at INFO for every JPEG 2000 slice it decodes; unless the user configured
# that logger, keep it to warnings so that a measurement's log is readable.
if logging.getLogger("openjpeg").level == logging.NOTSET:
    logging.getLogger("openjpeg").setLevel(logging.WARNING)

__all__ = ["TAGS", "HEADER_CHUNK", "SourceHeader", "MultiFrame", "read_header", "reads_direct", "is_uncompressed",
           "stored_dtype", "read_frame_into", "decode_frame", "read_multiframe", "apply_assumed",
           "check_pixel_length"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_RAW_SYNTAXES = (_IMPLICIT_LE, _EXPLICIT_LE)
_HAVE_PREADV = hasattr(os, "preadv")
HEADER_CHUNK = 1 << 14  # first read of a file's header; callers grow it to fit the previous file's header

# Tags read from every file: tag -> (keyword, kind). kind: s=string, m=multi-valued string, f=decimal list,
# i=integer string, u=unsigned short, q=sequence (whether it has items).
TAGS: Dict[int, Tuple[str, str]] = {
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
_FLOAT_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)  # pydicom's stop_before_pixels also stops at these


# ----------------------------------------------------------------------------------------------------------------------
# Header: the fast walker
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
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_TAGS_BY_WORD = {((t & 0xFFFF) << 16) | (t >> 16): v for t, v in TAGS.items()}
_NO_TAGS: Dict[int, Tuple[str, str]] = {}


def _convert(raw: bytes, kind: str):
    """Value bytes → Python value of ``kind`` (see ``TAGS``); unparsable numbers → None."""
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


def _walk(buf: bytes, pos: int, explicit: bool, out: Optional[dict], nested: bool = False,
          starts: Optional[list] = None) -> int:
    """Walk data elements from ``pos``; fill ``out`` with wanted tags; return the Pixel Data element position.

    In ``nested`` mode, walk one undefined-length item and return the position after its delimiter. ``starts``
    (top level only) collects the position of every element before the Pixel Data. This loop runs for every element
    of every file, so the common element costs one ``unpack`` and one dict lookup.
    """
    n = len(buf)
    wanted = _TAGS_BY_WORD if out is not None and not nested else _NO_TAGS
    long_vrs, short_vrs = _LONG_VRS, _SHORT_VRS
    mark = starts.append if starts is not None else None
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
        if mark is not None:
            mark(pos)
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


def _fast_header(path: str, chunk: int = HEADER_CHUNK) -> dict:
    """Parse the tags of ``TAGS`` and the Pixel Data offset without pydicom, reading ``chunk`` bytes first.

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
                buf += f.read(max(len(buf), HEADER_CHUNK))


def _parse_buffer(buf: bytes, size: int) -> dict:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unsupported("no preamble")
    h: dict = {}
    # File meta (group 0002): always explicit VR little endian.
    pos = 132
    n = len(buf)
    while pos + 8 <= n:
        g, e = _UNPACK_TAG(buf, pos)
        if g != 0x0002:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise _NeedMore
            length = _UNPACK_U32(buf, pos + 8)[0]
            start = pos + 12
        elif vr in _SHORT_VRS:
            length = _UNPACK_U16(buf, pos + 6)[0]
            start = pos + 8
        else:
            raise _Unsupported("unknown VR in the file meta information")
        tag = (g << 16) | e
        if start + length > n:
            raise _NeedMore
        if tag in TAGS:
            if vr not in _KIND_VRS[TAGS[tag][1]]:
                raise _Unsupported("unexpected VR in the file meta information")
            _store(h, TAGS[tag][0], TAGS[tag][1], buf[start:start + length])
        pos = start + length
    ts = h.get("TransferSyntaxUID", "")
    if ts in (_DEFLATED_LE, _EXPLICIT_BE) or not ts:
        raise _Unsupported("transfer syntax")
    explicit = ts != _IMPLICIT_LE
    meta_end = pos
    ppos = _walk(buf, pos, explicit, h)
    if ppos + 12 > n:
        raise _NeedMore
    if explicit:
        vr = buf[ppos + 4:ppos + 6]
        length = _UNPACK_U32(buf, ppos + 8)[0] if vr in _LONG_VRS else _UNPACK_U16(buf, ppos + 6)[0]
        start = ppos + (12 if vr in _LONG_VRS else 8)
    else:
        length = _UNPACK_U32(buf, ppos + 4)[0]
        start = ppos + 8
    h["_pixel_offset"] = start
    h["_pixel_length"] = None if length == 0xFFFFFFFF else length
    h["_file_size"] = size
    h["_has_pixels"] = True
    h["_source"] = SourceHeader(buf[:start], meta_end, ppos, not explicit)
    return h


# ----------------------------------------------------------------------------------------------------------------------
# Header: pydicom fallback and the public reader
# ----------------------------------------------------------------------------------------------------------------------
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
    h["_source"] = SourceHeader.of_dataset(ds)
    return h


def _dataset_header(ds) -> dict:
    h: dict = {}
    for kw, kind in TAGS.values():
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


def read_header(path: str, chunk: int = HEADER_CHUNK) -> dict:
    """The header of one file (see the module docstring for its keys): fast walker first, pydicom when it declines.

    Args:
        path: the file.
        chunk: bytes to read first (the walker reads more when the header is longer).

    Raises:
        BMDError: the file cannot be read, or is no DICOM file pydicom can read.
    """
    try:
        h = _fast_header(path, chunk)
    except _Unsupported:
        h = _pydicom_header(path)
    except (OSError, struct.error) as ex:
        raise BMDError(f"cannot read file ({type(ex).__name__}: {ex})", path=path) from None
    h["_path"] = path
    return h


# ----------------------------------------------------------------------------------------------------------------------
# The whole header, kept for the DICOM writers
# ----------------------------------------------------------------------------------------------------------------------
class SourceHeader:
    """Everything before the Pixel Data of one file, kept by the loader so that the DICOM writers need not open and
    parse the file again: the bytes the walker accepted (a few KB per file), or the dataset pydicom read.

    :meth:`dataset` gives what ``pydicom.dcmread(path, stop_before_pixels=True)`` gives, a new dataset each call: raw
    data elements (tag, VR, value bytes) that pydicom converts lazily, as it does for a file it reads. The element
    positions are found again only then (not while loading, where every microsecond per element counts).
    """

    __slots__ = ("_bytes", "_meta_end", "_pixel_pos", "_implicit", "_ds")

    def __init__(self, head: bytes, meta_end: int, pixel_pos: int, implicit: bool):
        """``head``: the file's bytes up to the Pixel Data value; ``meta_end``: where the data set starts;
        ``pixel_pos``: where the Pixel Data element starts; ``implicit``: implicit VR little endian."""
        self._bytes, self._meta_end, self._pixel_pos, self._implicit = head, meta_end, pixel_pos, implicit
        self._ds = None

    @classmethod
    def of_dataset(cls, ds) -> "SourceHeader":
        """The header of a file pydicom read (``stop_before_pixels``)."""
        src = cls(b"", 0, 0, False)
        src._ds = ds
        return src

    def dataset(self, path: str):
        """A new pydicom ``FileDataset`` of the header (``filename`` ``path``), elements converted lazily as pydicom
        does; None where the raw elements hold something pydicom reads in its own way (then read the file)."""
        if self._ds is not None:
            ds = copy.deepcopy(self._ds)
            ds.filename = path
            return ds
        try:
            return self._build(path)
        except Exception:  # anything unusual (or damaged in a sequence): the caller reads the file with pydicom
            return None

    def _elements(self, positions, implicit: bool, end: int) -> Dict[int, object]:
        """RawDataElements (or, for undefined lengths, the elements pydicom's reader gives) at ``positions``."""
        from pydicom.charset import convert_encodings, default_encoding
        from pydicom.dataelem import RawDataElement, empty_value_for_VR
        from pydicom.filereader import data_element_generator
        from pydicom.tag import BaseTag
        from pydicom.values import convert_string

        buf = self._bytes
        out: Dict[int, object] = {}
        encoding = default_encoding
        for i, pos in enumerate(positions):
            nxt = positions[i + 1] if i + 1 < len(positions) else end
            g, e = _UNPACK_TAG(buf, pos)
            number = (g << 16) | e
            if number in _FLOAT_PIXEL_TAGS:  # plain ints: BaseTag's comparisons are slow
                break
            tag = BaseTag(number)
            if implicit:
                vr, length, start = None, _UNPACK_U32(buf, pos + 4)[0], pos + 8
            else:
                vr = buf[pos + 4:pos + 6].decode("ascii")
                if vr.encode() in _LONG_VRS:
                    length, start = _UNPACK_U32(buf, pos + 8)[0], pos + 12
                else:
                    length, start = _UNPACK_U16(buf, pos + 6)[0], pos + 8
            if length == 0xFFFFFFFF:  # a sequence: read by pydicom's own element reader, as dcmread reads it
                fp = io.BytesIO(buf)
                fp.seek(pos)
                out[tag] = next(data_element_generator(fp, implicit, True, encoding=encoding))
                if fp.tell() != nxt:
                    raise _Unsupported("undefined-length element read differently")
                continue
            if start + length != nxt:
                raise _Unsupported("element lengths do not chain")
            value = buf[start:nxt] if length else empty_value_for_VR(vr, raw=True)
            if number == 0x00080005:
                encoding = convert_encodings(convert_string(value or b"", True))
            out[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)
        return out

    def _build(self, path: str):
        from pydicom.charset import convert_encodings, default_encoding
        from pydicom.dataelem import convert_raw_data_element
        from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

        buf = self._bytes
        starts: List[int] = []
        if _walk(buf, self._meta_end, not self._implicit, None, starts=starts) != self._pixel_pos:
            raise _Unsupported("the header changed")
        if starts:
            g = _UNPACK_TAG(buf, starts[0])[0]
            vr = buf[starts[0] + 4:starts[0] + 6]
            found_implicit = not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)
            if g == 0 or found_implicit != self._implicit:  # a command set, or pydicom's VR heuristic switches
                raise _Unsupported("pydicom reads this dataset differently")
        meta_starts = []
        pos = 132
        while pos < self._meta_end:
            meta_starts.append(pos)
            vr = buf[pos + 4:pos + 6]
            pos += 12 + _UNPACK_U32(buf, pos + 8)[0] if vr in _LONG_VRS else 8 + _UNPACK_U16(buf, pos + 6)[0]
        file_meta = FileMetaDataset(Dataset(self._elements(meta_starts, False, self._meta_end)))
        file_meta.set_original_encoding(False, True, default_encoding)
        elements = self._elements(starts, self._implicit, self._pixel_pos)
        data = Dataset(elements)
        charset = elements.get(0x00080005)
        encoding = convert_encodings(convert_raw_data_element(charset).value) if charset is not None \
            else default_encoding  # as pydicom's read_dataset sets it
        data.set_original_encoding(self._implicit, True, encoding)
        ds = FileDataset(path, data, buf[:128], file_meta, self._implicit, True)
        ds.set_original_encoding(self._implicit, True, data._character_set)
        return ds


# ----------------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------------
def is_uncompressed(h: dict) -> bool:
    """Whether the file is in an uncompressed little-endian transfer syntax (implicit or explicit VR)."""
    return h.get("TransferSyntaxUID") in _RAW_SYNTAXES


def reads_direct(h: dict) -> bool:
    """Whether :func:`read_frame_into` can read this (single-frame) file: uncompressed little endian, pixel offset
    known from the walker."""
    return h.get("TransferSyntaxUID") in _RAW_SYNTAXES and h.get("_pixel_offset") is not None


def stored_dtype(h: dict) -> np.dtype:
    """Little-endian numpy type of the stored values (BitsAllocated, PixelRepresentation)."""
    bits = int(h.get("BitsAllocated") or 16)
    signed = int(h.get("PixelRepresentation") or 0) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def apply_assumed(ds, h: dict) -> None:
    """Put the values the series rules assumed for missing attributes (``h["_assumed"]``) into pydicom's dataset
    ``ds``, so that its pixel decoders read the same format as the header."""
    for kw, value in (h.get("_assumed") or {}).items():
        setattr(ds, kw, value)


def check_pixel_length(length: int, h: dict, notes: Optional[set]) -> None:
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


def read_frame_into(h: dict, dst: np.ndarray) -> None:
    """Read the stored values of one uncompressed little-endian single-frame file (:func:`reads_direct`) into ``dst``
    ``(Rows, Columns)`` of :func:`stored_dtype` in place (no intermediate bytes object), honouring BitsStored.

    Raises:
        BMDError: undefined, too short or truncated Pixel Data.
    """
    path = h["_path"]
    need = dst.nbytes
    length = h.get("_pixel_length")
    if length is None:  # undefined length: encapsulated, impossible in an uncompressed transfer syntax
        raise BMDError(f"PixelData has an undefined length in the uncompressed transfer syntax "
                       f"{h.get('TransferSyntaxUID')}", path=path)
    if length < need:
        raise BMDError(f"pixel data too short (PixelData holds {length} of {need} bytes)", path=path)
    view = memoryview(dst.reshape(-1)).cast("B")
    if _HAVE_PREADV:  # one open and one read syscall, no buffered-reader object
        fd = os.open(path, os.O_RDONLY)
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
        with open(path, "rb") as f:
            f.seek(h["_pixel_offset"])
            got = f.readinto(view)
    if got != need:
        raise BMDError(f"truncated pixel data (PixelData: {got} of {need} bytes in the file)", path=path)
    if dst.dtype.byteorder == ">":
        dst.byteswap(inplace=True)
    _fix_bits(dst, h)


# Transfer syntax -> the imagecodecs decoder of one encapsulated frame (greyscale, single-frame files). imagecodecs
# releases the GIL, so read_pixels' threads decode slices in parallel; pydicom's handlers do not.
_FAST_DECODERS = {
    "1.2.840.10008.1.2.4.80": "jpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "jpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "jpeg2k",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "jpeg2k",  # JPEG 2000
    "1.2.840.10008.1.2.4.57": "ljpeg",  # JPEG lossless, non-hierarchical (process 14)
    "1.2.840.10008.1.2.4.70": "ljpeg",  # JPEG lossless, first-order prediction (process 14, SV1)
    "1.2.840.10008.1.2.5": "dicomrle",  # RLE lossless
}
# (folder, transfer syntax, pixel representation, bits stored) -> whether the fast decoder gave exactly pydicom's
# stored values on the first slice decoded with that key (checked once, then trusted or avoided)
_FAST_CHECKED: Dict[tuple, bool] = {}


def _fast_key(h: dict) -> Optional[tuple]:
    """The :data:`_FAST_CHECKED` key of a single-frame 16-bit greyscale slice in a transfer syntax of
    :data:`_FAST_DECODERS`; None for anything else."""
    ts = h.get("TransferSyntaxUID", "")
    if ts not in _FAST_DECODERS or h.get("_pixel_offset") is None or \
            int(h.get("SamplesPerPixel") or 1) != 1 or int(h.get("BitsAllocated") or 0) != 16:
        return None
    return os.path.dirname(h["_path"]), ts, int(h.get("PixelRepresentation") or 0), int(h.get("BitsStored") or 16)


def _fast_decode(h: dict) -> Optional[np.ndarray]:
    """Stored values of a slice (see :func:`_fast_key`) decoded by imagecodecs (CharLS, OpenJPEG, the lossless-JPEG
    and DICOM RLE decoders) from the file's fragments at the header's pixel offset: no pydicom dataset, and the GIL is
    released while decoding. Signed data are sign-extended from BitsStored, as pydicom does. None on any problem (the
    caller then uses pydicom)."""
    try:
        import imagecodecs
        from pydicom.encaps import generate_frames

        with open(h["_path"], "rb") as f:
            f.seek(h["_pixel_offset"])
            frame = next(generate_frames(f.read(), number_of_frames=1))
        kind = _FAST_DECODERS[h["TransferSyntaxUID"]]
        signed = int(h.get("PixelRepresentation") or 0) == 1
        if kind == "jpegls":
            arr = imagecodecs.jpegls_decode(frame)
        elif kind == "jpeg2k":
            arr = imagecodecs.jpeg2k_decode(frame, numthreads=1)
        elif kind == "ljpeg":
            arr = imagecodecs.ljpeg_decode(frame)
        else:
            dt = "<i2" if signed else "<u2"  # the decoder returns bytes in the byte order asked for
            arr = np.frombuffer(imagecodecs.dicomrle_decode(frame, dt), dt)
            arr = arr.reshape(int(h.get("Rows") or 0), int(h.get("Columns") or 0))
    except Exception:  # missing codec, malformed fragments, decoder error: pydicom decides and reports
        return None
    if arr.shape != (int(h.get("Rows") or 0), int(h.get("Columns") or 0)) or arr.dtype.itemsize != 2:
        return None
    bits = int(h.get("BitsStored") or 16)
    if signed:
        if bits == 16 and arr.dtype == np.int16:
            return arr
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


def decode_frame(h: dict) -> np.ndarray:
    """Stored values ``(Rows, Columns)`` of one single-frame file in any transfer syntax, decoded by pydicom's
    handlers; JPEG-LS, JPEG 2000, lossless JPEG and RLE by imagecodecs directly (:func:`_fast_decode`) once the first
    slice of its folder and format decoded identically both ways.

    Raises:
        BMDError: no or empty Pixel Data, too long uncompressed Pixel Data, a decoder error, not one 2-D frame.
    """
    import pydicom

    path = h["_path"]
    key = _fast_key(h)
    direct = None
    if key is not None and _FAST_CHECKED.get(key) is not False:
        direct = _fast_decode(h)
        if direct is not None and _FAST_CHECKED.get(key):
            return direct
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            if h.get("_pixel_offset") is not None:  # the header walk found it: pydicom lost it at the file's end
                raise BMDError("truncated pixel data (the file ends inside the encapsulated PixelData)", path=path)
            raise BMDError("no PixelData element (no image)", path=path)
        if _pixel_data_empty(ds):
            raise BMDError("PixelData is empty (no encoded frame)", path=path)
        apply_assumed(ds, h)
        if h.get("TransferSyntaxUID") in _RAW_SYNTAXES:
            check_pixel_length(len(ds.PixelData), h, None)
        arr = ds.pixel_array
    except BMDError:
        raise
    except Exception as ex:  # decoder errors come in many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?") if "ds" in locals() else "?"
        raise BMDError(f"cannot decode pixel data (transfer syntax {ts}: {type(ex).__name__}: {ex})",
                       path=path) from None
    if key is not None and key not in _FAST_CHECKED:
        _FAST_CHECKED[key] = direct is not None and direct.shape == arr.shape and np.array_equal(direct, arr)
    if arr.ndim != 2:
        raise BMDError(f"unexpected pixel array shape {arr.shape}", path=path)
    return arr


class MultiFrame:
    """A decoded multi-frame file: ``pixels`` ``(F, R, C)`` stored values, ``num_frames`` (NumberOfFrames),
    ``num_per_frame`` (items of the Per-frame Functional Groups Sequence, None without one) and :meth:`value`."""

    def __init__(self, ds, pixels: np.ndarray):
        self._ds = ds
        self.pixels = pixels
        self.num_frames = int(ds.get("NumberOfFrames", 1) or 1)
        shared = ds.get("SharedFunctionalGroupsSequence")
        self._shared = shared[0] if shared else None
        self._per = ds.get("PerFrameFunctionalGroupsSequence")
        self.num_per_frame = None if self._per is None else len(self._per)

    @staticmethod
    def _group_value(item, seq_kw: str, kw: str):
        seq = item.get(seq_kw) if item is not None else None
        if seq and len(seq) and kw in seq[0]:
            return seq[0][kw].value
        return None

    def value(self, f: int, seq_kw: str, kw: str, default=None):
        """``kw`` of frame ``f`` (0-based): from its functional group ``seq_kw``, else the shared one, else the top
        level (an empty value counts as missing); ``default`` when none has it."""
        v = self._group_value(self._per[f], seq_kw, kw)
        if v is None:
            v = self._group_value(self._shared, seq_kw, kw)
        if v is None:
            v = self._ds.get(kw, None)
            v = v if v not in ("", None) else None
        return default if v is None else v


def read_multiframe(h: dict) -> MultiFrame:
    """Decode a (enhanced) multi-frame file with pydicom (the assumed pixel attributes applied).

    Raises:
        BMDError: the pixel data cannot be decoded.
    """
    import pydicom

    path = h["_path"]
    try:
        ds = pydicom.dcmread(path)
        apply_assumed(ds, h)
        pix = ds.pixel_array
    except Exception as ex:  # pydicom raises many types for broken pixel data
        raise BMDError(f"cannot decode multi-frame pixel data ({type(ex).__name__}: {ex})", path=path) from None
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    pix = pix.reshape((nf,) + pix.shape[-2:]) if pix.ndim >= 2 else pix
    return MultiFrame(ds, pix)
