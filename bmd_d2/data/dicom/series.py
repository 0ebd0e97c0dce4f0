"""CT series rules: DICOM (folder, file list or one multi-frame file) → HU ``Volume`` with its geometry.

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


Files are read only through :mod:`bmd_d2.data.dicom.reader` (``read_header``, ``read_frame_into``, ``decode_frame``,
``read_multiframe``); stored values become HU in :mod:`bmd_d2.data.dicom.pixels`. For DICOM input the volume keeps
every source file's whole header (``Volume.source_headers``) for the DICOM writers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import BMDError
from .pixels import NotExact, check_dtype_arg, read_pixels, resolve_output_dtype
from .reader import HEADER_CHUNK, check_pixel_length, is_uncompressed, read_header, read_multiframe
from .volume import Volume, load_nifti

logger = logging.getLogger(__name__)

__all__ = ["SeriesInfo", "find_dicom_files", "list_series", "load_series", "load_volume"]

PathLike = Union[str, os.PathLike]

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")

_POS_TOL_MM = 0.01  # slices closer than this along the normal are duplicates
_SPACING_RTOL = 0.02  # relative deviation of a slice gap from the median that counts as uneven
_TILT_TOL_DEG = 0.1
_AXIAL_TOL_DEG = 30.0  # slice normal within this angle of the patient z axis counts as axial


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
    chunk = HEADER_CHUNK
    for path in files:
        try:
            if os.path.getsize(path) == 0:
                raise BMDError("zero-byte file", path=path)
            if not os.access(path, os.R_OK):
                raise BMDError("file is not readable (permissions)", path=path)
            h = read_header(path, chunk)
        except BMDError as ex:
            if explicit_list:
                raise
            skipped.append(str(ex))
            continue
        if h.get("_pixel_offset"):  # files of one series have headers of about the same size
            chunk = max(HEADER_CHUNK, h["_pixel_offset"] + 4096)
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


def _multiframe_frames(h: dict, warnings: List[str]) -> Tuple[List[_Frame], np.ndarray]:
    """Frames and stored pixels ``(F, R, C)`` of an (enhanced) multi-frame file."""
    path = h["_path"]
    mf = read_multiframe(h)
    nf = mf.num_frames
    if mf.num_per_frame is None or mf.num_per_frame != nf:
        raise BMDError("multi-frame file without per-frame functional groups (ImagePositionPatient per frame)",
                       path=path)
    frames = []
    for f in range(nf):
        ipp = mf.value(f, "PlanePositionSequence", "ImagePositionPatient")
        iop = mf.value(f, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = mf.value(f, "PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or ps is None:
            raise BMDError(f"frame {f + 1} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing", path=path)
        slope = mf.value(f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = mf.value(f, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None or intercept is None:
            if f == 0:
                warnings.append(f"{path}: no RescaleSlope/Intercept; stored values used as HU")
            slope, intercept = 1.0, 0.0
        _check_rescale(float(slope), float(intercept), path)
        thick = mf.value(f, "PixelMeasuresSequence", "SliceThickness")
        fh = dict(h)
        if thick is not None:
            fh["SliceThickness"] = [float(thick)]
        frames.append(_Frame(path=path, frame=f, ipp=np.array([float(v) for v in ipp]),
                             iop=np.array([float(v) for v in iop]),
                             pixel_spacing=(float(ps[0]), float(ps[1])), slope=float(slope),
                             intercept=float(intercept), sop_uid=h.get("SOPInstanceUID", ""), header=fh))
    return frames, mf.pixels


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
    if is_uncompressed(h) and h.get("_pixel_length") is not None:
        check_pixel_length(h["_pixel_length"], h, warnings_once)
    return _Frame(path=path, frame=None, ipp=np.array(ipp, dtype=np.float64), iop=np.array(iop, dtype=np.float64),
                  pixel_spacing=(float(ps[0]), float(ps[1])), slope=float(slope[0]), intercept=float(intercept[0]),
                  sop_uid=h.get("SOPInstanceUID", ""), header=h)


_MAX_SLOPE = 100.0  # HU per stored unit; CT uses 1 (sometimes 0.5-2); anything near this is not a CT image
_MAX_INTERCEPT = 32768.0


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
    out_dtype = resolve_output_dtype(frames, dtype, resample_to is not None, source)
    try:
        hu = read_pixels(frames, pixels, rows, cols, out_dtype, workers)
    except NotExact:  # some HU lie outside -32768..32767
        if dtype == "int16":
            raise BMDError("HU cannot be stored exactly as int16 (values outside -32768..32767); use dtype='auto' or "
                           "'float32'", path=source) from None
        hu = read_pixels(frames, pixels, rows, cols, np.dtype(np.float32), workers)

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
    dtype = check_dtype_arg(dtype)
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
    kept = {h["_path"]: h["_source"] for h in hs if h.get("_source") is not None}
    sources = {f: kept[f] for f in dict.fromkeys(meta["files"]) if f in kept}
    return Volume(data=hu, affine=affine, meta=meta, warnings=warnings, source_headers=sources)



def load_volume(source: Union[PathLike, Sequence[PathLike]], series_uid: Optional[str] = None, **kwargs) -> Volume:
    """Load a CT volume from a NIfTI file (``.nii``/``.nii.gz``) or DICOM (anything else); see :func:`load_series`.

    ``dtype`` ("auto", float32, int16) applies to both; other keyword arguments go to :func:`load_series`.
    """
    if not isinstance(source, (list, tuple)) and str(source).lower().endswith((".nii", ".nii.gz")):
        return load_nifti(source, dtype=kwargs.get("dtype", np.float32))
    return load_series(source, series_uid=series_uid, **kwargs)
