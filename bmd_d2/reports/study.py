"""One study's output folder: every report written in order, atomically; ``result.json`` last marks it finished.

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``
(:func:`bmd_d2.utils.files.atomic_path`), so a reader (or a resumed batch) never sees a half-written file.
``result.json`` is written last: its presence marks a finished study (see :func:`is_finished`).

The files: ``vertebrae.csv`` (:mod:`bmd_d2.reports.tables`, columns there), ``overlay.png``
(:mod:`bmd_d2.reports.overlay`), ``result.json``, optionally ``masks.nii.gz`` (:mod:`bmd_d2.reports.nifti`) and the
DICOM SEG/SR/SC (:mod:`bmd_d2.reports.dicom`).
"""
import json
import logging
import os
from typing import Dict, Iterable, List, Optional

from bmd_d2.errors import BMDError, one_line
from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.logs import redact

from .dicom import KINDS, OUTPUT_NAMES, write_dicom_outputs
from .dicom_sources import DicomOutputsUnavailable
from .nifti import write_masks_nifti
from .overlay import write_overlay
from .tables import write_csv, write_json

logger = logging.getLogger(__name__)

RESULT_JSON = "result.json"
VERTEBRAE_CSV = "vertebrae.csv"
OVERLAY_PNG = "overlay.png"
MASKS_NII = "masks.nii.gz"

OPTIONAL_OUTPUTS = ("masks", "dicom_seg", "dicom_sr", "dicom_sc")


def remove_stale_temp_files(out_dir: str) -> int:
    """Delete the temporary files an interrupted :func:`atomic_path` left in ``out_dir`` (e.g. after SIGKILL).

    Returns:
        how many were removed.
    """
    n = 0
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return 0
    for e in entries:
        if e.is_file() and e.name.startswith(".") and ".tmp" in e.name:
            try:
                os.remove(e.path)
                n += 1
            except OSError:
                pass
    return n


def requested_outputs(*, masks: bool = False, dicom: Iterable[str] = ()) -> List[str]:
    """Names (:data:`OPTIONAL_OUTPUTS`) of the optional outputs that these :func:`write_study` arguments ask for."""
    kinds = set(dicom)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown DICOM output kind(s) {sorted(unknown)}; expected seg, sr, sc")
    return (["masks"] if masks else []) + [OUTPUT_NAMES[k] for k in KINDS if k in kinds]


def _source_hint(result: StudyResult) -> str:
    meta = getattr(result.volume, "meta", None) or {}
    return str(meta.get("source") or result.study.get("source") or result.study_id)


def write_study(result: StudyResult, out_dir: str, *, overlay: bool = True, masks: bool = False,
                dicom: Iterable[str] = ()) -> Dict[str, str]:
    """Write every report of one study into ``out_dir``; a failing optional output never loses the measurement.

    Order: ``vertebrae.csv`` and ``overlay.png``, then ``result.json`` (``outputs.complete`` false while optional
    outputs remain), then each optional output in turn (``masks.nii.gz``; the DICOM objects ``"seg"``, ``"sr"``,
    ``"sc"`` of :mod:`bmd_d2.reports.dicom`), then ``result.json`` again with ``outputs`` filled in and
    ``complete`` true: that second write marks the study finished (:func:`is_finished`). Every file is atomic.

    An optional output that fails becomes ``outputs.failed[name]`` (a one-line reason naming the output, the source
    file and the attribute where known), the study QC flag ``output_not_written`` and a one-line warning; the other
    outputs are still written. DICOM outputs of a non-DICOM input are ``outputs.skipped`` with a warning.

    Returns:
        name → path of the files written (``csv``, ``overlay``, ``json``, ``masks``, ``dicom_seg``, ...).
    """
    requested = requested_outputs(masks=masks, dicom=dicom)
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp_files(out_dir)
    paths = {"csv": os.path.join(out_dir, VERTEBRAE_CSV), "json": os.path.join(out_dir, RESULT_JSON)}
    result.outputs = {"requested": requested, "written": [], "failed": {}, "skipped": {},
                      "complete": not requested}
    write_csv(result, paths["csv"])
    if overlay:
        try:
            path = os.path.join(out_dir, OVERLAY_PNG)
            write_overlay(result, path)
            paths["overlay"] = path
        except Exception as e:  # a figure that cannot be drawn must not cost the measurement
            _output_failed(result, "overlay", f"overlay not written: {one_line_reason(e)}")
    result.outputs["written"] = sorted(os.path.basename(p) for k, p in paths.items() if k != "json")
    write_json(result, paths["json"])
    if not requested:
        return paths

    if masks:
        try:
            path = os.path.join(out_dir, MASKS_NII)
            write_masks_nifti(result, path)
            paths["masks"] = path
        except Exception as e:
            _output_failed(result, "masks", f"masks.nii.gz not written: {_source_hint(result)}: {one_line_reason(e)}")
    kinds = [k for k in KINDS if k in set(dicom)]
    if kinds:
        errors: Dict[str, str] = {}
        try:
            paths.update(write_dicom_outputs(result, out_dir, kinds, overlay_png=paths.get("overlay"),
                                             errors=errors))
        except DicomOutputsUnavailable as e:
            for k in kinds:
                result.outputs["skipped"][OUTPUT_NAMES[k]] = one_line_reason(e)
            logger.warning("%s: DICOM outputs skipped: %s", result.study_id, one_line_reason(e))
        except Exception as e:  # anything the writers did not isolate themselves
            errors.setdefault("dicom", f"DICOM outputs not written: {_source_hint(result)}: {one_line_reason(e)}")
        for name, msg in errors.items():
            _output_failed(result, name, msg)
    result.outputs["written"] = sorted(os.path.basename(p) for k, p in paths.items() if k != "json")
    result.outputs["complete"] = True
    write_json(result, paths["json"])
    return paths


def one_line_reason(e: BaseException) -> str:
    """An exception as one line: a ``BMDError``'s message as it is, anything else prefixed by its type name.

    A library's message may quote header values (e.g. pydicom's "Unable to convert '19450317' to 'DA'"): it is
    redacted like a third-party log line (:func:`bmd_d2.utils.logs.redact`), as it goes into logs and CSV files.
    """
    msg = one_line(e)
    return redact(msg) if isinstance(e, BMDError) else f"{type(e).__name__}: {redact(msg, third_party=True)}"


def _output_failed(result: StudyResult, name: str, message: str):
    # the writers' messages may quote a source header's value (e.g. a malformed birth date): never keep it
    message = redact(one_line(message), third_party=True)
    result.outputs["failed"][name] = message
    if "output_not_written" not in result.qc_flags:
        result.qc_flags.append("output_not_written")
    logger.warning("%s: %s", result.study_id, message)


def is_finished(out_dir: str, requested: Optional[Iterable[str]] = None) -> bool:
    """Whether ``out_dir`` holds a finished study (:func:`is_finished_result` of its ``result.json``)."""
    return is_finished_result(read_result(out_dir), requested)


def is_finished_result(result_dict: Optional[Dict], requested: Optional[Iterable[str]] = None) -> bool:
    """Whether a ``result.json`` dict marks a finished study: ``outputs.complete`` (written last by
    :func:`write_study`; a ``result.json`` of an older version without ``outputs`` counts as finished).

    Args:
        requested: optional outputs (:data:`OPTIONAL_OUTPUTS` names) the caller wants; a study written without one
            of them is not finished for this caller (a rerun with ``--dicom-outputs`` adds them).
    """
    d = result_dict
    if not isinstance(d, dict) or "vertebrae" not in d:
        return False
    outputs = d.get("outputs")
    if outputs is None:
        return not requested
    if not isinstance(outputs, dict) or outputs.get("complete") is not True:
        return False
    return set(requested or ()) <= set(outputs.get("requested") or ())


def read_result(out_dir: str) -> Optional[Dict]:
    """The ``result.json`` dict of a finished study, or None."""
    try:
        with open(os.path.join(out_dir, RESULT_JSON), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
