"""The source CT headers the DICOM writers build on: re-read, checked to be the series measured, and prepared.

Real-world (de-identified) sources: the writers get copies of the source headers prepared by :func:`prepare_sources`
(missing Type 2 attributes present and empty; empty or missing Study/Series/SOP Instance/Frame of Reference UIDs
generated deterministically, recorded in ``study["generated_uids"]`` and the study flag ``source_uids_generated``);
docs/dicom_outputs.md, "Real-world sources". DICOM outputs need a DICOM source: a NIfTI input gives
:class:`DicomOutputsUnavailable`.
"""
import copy
import hashlib
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np

from bmd_d2.errors import BMDError
from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.logs import redact, register_phi_from_dataset

# two slice positions closer than this (mm, along the slice normal) count as one
POSITION_TOL_MM = 0.01

# UIDs the outputs take from the source; empty or missing ones are generated (see prepare_sources)
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
# Type 2 attributes of the source that highdicom copies or reads: present-and-empty when missing
SOURCE_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "StudyID", "SeriesNumber", "PositionReferenceIndicator")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_CT_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.2.2")
DEIDENTIFICATION_NOT_RECORDED = "not recorded in the source images"
UIDS_FLAG = "source_uids_generated"
_DROP_IF_EMPTY = ("SpecificCharacterSet", "LossyImageCompression")


class DicomOutputsUnavailable(ValueError):
    """The result cannot give DICOM outputs (e.g. the input was NIfTI, or the source files are gone)."""


class SourceHeaderError(BMDError):
    """A source image lacks an attribute the writer needs, or has a bad value (message: ``<file>: <problem>``)."""


def is_dicom_result(result: StudyResult) -> bool:
    """Whether ``result`` was measured on a DICOM series whose files are listed in ``result.volume.meta``."""
    meta = getattr(result.volume, "meta", None) or {}
    return bool(meta.get("files")) and bool(meta.get("SOPInstanceUIDs")) and meta.get("format") != "nifti"


def header_text(ds, keyword: str) -> str:
    """The value of ``keyword`` in ``ds`` as stripped text; "" when missing or empty."""
    if keyword not in ds:
        return ""
    value = ds[keyword].value
    return "" if value is None else str(value).strip()


def _measured_series_uid(meta: Dict) -> str:
    """The measured SeriesInstanceUID; "" when the images had none (the loader then groups them under a placeholder
    in angle brackets)."""
    uid = str(meta.get("SeriesInstanceUID") or "")
    return "" if uid.startswith("<") else uid


def read_source_datasets(result: StudyResult) -> List:
    """The source CT datasets (headers, no pixel data) in slice order, one per file of ``volume.meta["files"]``.

    The headers the loader kept (``volume.source_headers``: parsed once, when the series was loaded) are used; a file
    not kept there (a volume made by hand, or files swapped since) is read with pydicom.

    Raises:
        DicomOutputsUnavailable: not a DICOM input, or a file cannot be read / is not the series measured (the
            message says which: a file of another series, or one whose SeriesInstanceUID is empty or missing).
    """
    import pydicom

    if not is_dicom_result(result):
        src = (getattr(result.volume, "meta", None) or {}).get("source") or result.study.get("source") or "input"
        raise DicomOutputsUnavailable(f"DICOM outputs need a DICOM series as input; {src} is not one")
    meta = result.volume.meta
    want = _measured_series_uid(meta)
    files = list(dict.fromkeys(meta["files"]))  # a multi-frame file is listed once per frame
    kept = getattr(result.volume, "source_headers", None) or {}
    out = []
    for f in files:
        try:
            ds = kept[f].dataset(f) if f in kept else None
            if ds is None:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types
            raise DicomOutputsUnavailable(f"cannot re-read source image {f}: {type(e).__name__}: "
                                          f"{redact(str(e), third_party=True)}") from None
        register_phi_from_dataset(ds)  # before highdicom reads (and may log) any of its values
        got = header_text(ds, "SeriesInstanceUID")
        if got != want:
            if not want:
                why = f"belongs to series {got}, but the measured images had no SeriesInstanceUID"
            elif not got:
                why = (f"has {'an empty' if 'SeriesInstanceUID' in ds else 'no'} SeriesInstanceUID, but the measured "
                       f"series is {want}")
            else:
                why = f"belongs to series {got}, not the measured series {want} (changed since it was measured?)"
            raise DicomOutputsUnavailable(f"source image {f} {why}")
        out.append(ds)
    return out


def source_path(ds) -> str:
    """The file a source dataset was read from (for messages), or ``source image``."""
    return str(getattr(ds, "filename", None) or "source image")


def _source_key(datasets) -> str:
    """A stable identity of the source series for generated UIDs: its SeriesInstanceUID when it has one, else a
    digest of the file names and sizes and the bytes of its first and last file (independent of the folder)."""
    series = Counter(s for s in (header_text(ds, "SeriesInstanceUID") for ds in datasets) if s)
    if series:
        return series.most_common(1)[0][0]
    h = hashlib.sha256()
    paths = [source_path(ds) for ds in datasets]
    for p in paths:
        h.update(os.path.basename(p).encode("utf-8", "replace") + b"\0")
        h.update(str(os.path.getsize(p) if os.path.isfile(p) else -1).encode() + b"\0")
    for p in dict.fromkeys((paths[0], paths[-1])):
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _slice_spacing(datasets) -> Optional[float]:
    """Median distance (mm) of consecutive source slice positions along the slice normal, or None."""
    try:
        iop = np.array([float(x) for x in datasets[0].ImageOrientationPatient])
        pos = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError):
        return None
    d = np.abs(np.diff(pos @ np.cross(iop[:3], iop[3:])))
    d = d[d > POSITION_TOL_MM]
    return float(np.median(d)) if d.size else None


def _carriable(ds, keyword: str) -> bool:
    """Whether the value of a :data:`SOURCE_TYPE2` attribute can be written as it is: a date/time that its VR parses
    (highdicom converts them) and a PatientSex of M, F or O; other attributes always."""
    from pydicom.valuerep import DA, DT, TM

    text = header_text(ds, keyword)
    if not text:
        return True
    vr = ds[keyword].VR
    try:
        if vr in ("DA", "TM", "DT"):
            {"DA": DA, "TM": TM, "DT": DT}[vr](text)
    except (ValueError, TypeError, OverflowError):
        return False
    return keyword != "PatientSex" or text in ("M", "F", "O")


def prepare_sources(result: StudyResult, datasets: Sequence, *, copy_datasets: bool = True) -> List:
    """Copies of the source datasets that the writers (highdicom) can use for any real-world (de-identified) source.

    The source files are never changed, nor are ``datasets`` unless ``copy_datasets=False`` (for datasets the caller
    has just read and owns, e.g. :func:`write_dicom_outputs`: saves the deep copies). In the copies:

    * a missing Type 2 attribute of :data:`SOURCE_TYPE2` is added empty (an empty one stays empty); one whose value
      the outputs cannot carry (a malformed date/time, a PatientSex other than M/F/O) is emptied and its name (never
      the value) listed in ``result.study["emptied_attributes"]``;
    * an empty or missing UID of :data:`SOURCE_UIDS` gets a value: Study/Series/Frame of Reference UIDs the value the
      other images of the series carry (the most common), else one generated UID for the series; SOPInstanceUID one
      generated UID per file. Generated UIDs are deterministic (``generate_uid(entropy_srcs=...)`` of the series'
      identity (:func:`_source_key`), the attribute, and for SOP instances the file name, InstanceNumber and
      ImagePositionPatient), so measuring the same files again references the same UIDs;
    * an empty or missing SOPClassUID becomes the file meta's MediaStorageSOPClassUID when that is a CT class, else
      CT Image Storage (Enhanced CT Image Storage for a multi-frame file);
    * an empty or missing SliceThickness (single-frame images) becomes the slice spacing of the positions;
    * PatientIdentityRemoved ``YES`` without DeidentificationMethod (Code Sequence) gets DeidentificationMethod
      :data:`DEIDENTIFICATION_NOT_RECORDED` (Type 1C then); an empty DeidentificationMethod is removed otherwise;
    * an empty attribute of :data:`_DROP_IF_EMPTY` (Type 1/1C where the writers copy it) is removed: the default
      character repertoire, and highdicom's default LossyImageCompression ``00``.

    Whatever was filled in for a UID is recorded in ``result.study["generated_uids"]`` (attribute → value; for
    SOPInstanceUID a list per file, None where the file had its own) and flags the study :data:`UIDS_FLAG`. Copies
    already prepared are returned as they are.
    """
    from pydicom.datadict import dictionary_VR
    from pydicom.uid import generate_uid

    datasets = list(datasets)
    if all(getattr(ds, "_bmd_d2_prepared", False) for ds in datasets):
        return datasets
    out = [copy.deepcopy(ds) for ds in datasets] if copy_datasets else datasets
    key = None
    generated: Dict = {}

    def uid(*parts) -> str:
        nonlocal key
        if key is None:
            key = _source_key(datasets)
        return str(generate_uid(entropy_srcs=[key, *[str(p) for p in parts]]))

    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = [header_text(ds, kw) for ds in out]
        if all(values):
            continue
        present = Counter(v for v in values if v)
        value = present.most_common(1)[0][0] if present else uid(kw)
        for ds, v in zip(out, values):
            if not v:
                ds.add_new(kw, "UI", value)
        generated[kw] = value
    sop = [None] * len(out)
    for i, ds in enumerate(out):
        if not header_text(ds, "SOPInstanceUID"):
            sop[i] = uid("SOPInstanceUID", os.path.basename(source_path(ds)), header_text(ds, "InstanceNumber"),
                         header_text(ds, "ImagePositionPatient"), i)
            ds.add_new("SOPInstanceUID", "UI", sop[i])
    if any(sop):
        generated["SOPInstanceUID"] = sop
    for ds in out:
        if not header_text(ds, "SOPClassUID"):
            meta_class = header_text(getattr(ds, "file_meta", None) or {}, "MediaStorageSOPClassUID")
            multi = "PerFrameFunctionalGroupsSequence" in ds or header_text(ds, "NumberOfFrames") not in ("", "1")
            value = meta_class if meta_class in _CT_CLASSES else \
                (ENHANCED_CT_IMAGE_STORAGE if multi else CT_IMAGE_STORAGE)
            ds.add_new("SOPClassUID", "UI", value)
            generated["SOPClassUID"] = value
    thickness = None
    emptied = []
    for ds in out:
        for kw in SOURCE_TYPE2:
            if kw not in ds:
                ds.add_new(kw, dictionary_VR(kw), None)
            elif not _carriable(ds, kw):
                ds.add_new(kw, dictionary_VR(kw), None)
                emptied.append(kw)
        if not header_text(ds, "SliceThickness") and "PerFrameFunctionalGroupsSequence" not in ds:
            thickness = thickness if thickness is not None else _slice_spacing(out)
            if thickness is not None:
                ds.add_new("SliceThickness", "DS", f"{thickness:.6g}")
        for kw in _DROP_IF_EMPTY:
            if kw in ds and not header_text(ds, kw):
                del ds[kw]
        if not header_text(ds, "DeidentificationMethod") and not ds.get("DeidentificationMethodCodeSequence"):
            if header_text(ds, "PatientIdentityRemoved").upper() == "YES":
                ds.add_new("DeidentificationMethod", "LO", DEIDENTIFICATION_NOT_RECORDED)
            elif "DeidentificationMethod" in ds:
                del ds["DeidentificationMethod"]
        object.__setattr__(ds, "_bmd_d2_prepared", True)
    if emptied:
        result.study["emptied_attributes"] = sorted(set(emptied) | set(result.study.get("emptied_attributes") or []))
    if generated:
        result.study["generated_uids"] = generated
        if UIDS_FLAG not in result.qc_flags:
            result.qc_flags.append(UIDS_FLAG)
    return out




def prepared_sources(result: StudyResult, source_datasets: Optional[Sequence]) -> List:
    """``source_datasets`` (default :func:`read_source_datasets`) through :func:`prepare_sources`."""
    return prepare_sources(result, source_datasets if source_datasets is not None else read_source_datasets(result))
