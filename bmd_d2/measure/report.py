"""Study reports: JSON, CSV (one row per vertebra), overlay PNG, optional NIfTI masks — all written atomically.

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``, so a reader
(or a resumed batch) never sees a half-written file. ``result.json`` is written last: its presence marks a finished
study (see :func:`is_finished`).

CSV columns (``vertebrae.csv``; empty cell = not available):

==========================  ==========================================================================================
``study_id``                the study's output name
``level``                   T11 … L5, S1 (empty when it cannot be named; see qc_flags)
``structure``               ``vertebral_body`` or ``sacrum`` (detector class)
``score``                   detection confidence, 0–1
``bmd_mg_cm3``              reported BMD (MEASURE.PRIMARY_BMD: learned or classical), mg/cm³
``category``                ACR QCT category of ``bmd_mg_cm3`` for this vertebra alone
``learned_bmd_mg_cm3``      the model's estimate, mg/cm³
``classical_bmd_mg_cm3``    from ``trabecular_hu`` through the calibration, mg/cm³
``classical_bmd_3d_mg_cm3`` from ``trabecular_hu_3d`` through the calibration, mg/cm³
``bmd_difference_mg_cm3``   learned − classical, mg/cm³
``trabecular_hu``           mean HU in the eroded mask over the 3 sagittal slices
``trabecular_hu_sd``        SD of those HU values
``trabecular_hu_3d``        mean HU in the 3-D core (± CORE_HALF_WIDTH_MM laterally)
``roi_pixels``              pixels in the sagittal ROI (3 slices together)
``roi_voxels_3d``           samples in the 3-D core
``core_3d_reason``          why ``trabecular_hu_3d`` is empty (slices_too_thick, outside_volume, no_roi, ...; figures
                            in result.json ``core_3d_detail``)
``height_{anterior,middle,posterior}_mm``  vertebral heights, mm
``height_loss_pct``         height reduction, % (wedge/biconcave/crush; bmd_d2.measure.qc)
``genant_grade``            Genant semi-quantitative grade 0–3 (20/25/40 % reduction)
``centroid_{x,y,z}_mm``     mask centre in patient coordinates (DICOM LPS), mm
``box_{x0,y0,x1,y1}``       box in sagittal pixels
``qc_flags``                ``;``-separated flags (docs/measurement.md)
==========================  ==========================================================================================

``studies.csv`` (batch) has one row per study: :data:`STUDY_COLUMNS`.
"""
import csv
import io
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional

import numpy as np

from bmd_d2.data.levels import THING_CLASSES

from .result import StudyResult

logger = logging.getLogger(__name__)

RESULT_JSON = "result.json"
VERTEBRAE_CSV = "vertebrae.csv"
OVERLAY_PNG = "overlay.png"
MASKS_NII = "masks.nii.gz"

VERTEBRA_COLUMNS = [
    "study_id", "level", "structure", "score", "bmd_mg_cm3", "category", "learned_bmd_mg_cm3",
    "classical_bmd_mg_cm3", "classical_bmd_3d_mg_cm3", "bmd_difference_mg_cm3", "trabecular_hu", "trabecular_hu_sd",
    "trabecular_hu_3d", "roi_pixels", "roi_voxels_3d", "core_3d_reason", "height_anterior_mm", "height_middle_mm",
    "height_posterior_mm", "height_loss_pct", "genant_grade", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "box_x0", "box_y0", "box_x1", "box_y1", "qc_flags",
]
STUDY_COLUMNS = [
    "study_id", "status", "n_vertebrae", "levels", "acr_levels", "acr_bmd_mg_cm3", "acr_category",
    "acr_bmd_classical_mg_cm3", "acr_category_classical", "l1_hu", "hu_category", "qc_flags", "reason",
]


# ---------------------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path`` (same suffix); on success it replaces ``path``, on error it is removed.

    Example::

        with atomic_path("out/overlay.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str):
    """Write ``text`` (UTF-8) to ``path`` atomically, fsync'ed before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if not np.isfinite(x) else f"{x:.6g}"
    if isinstance(x, (list, tuple)):
        return ";".join(str(v) for v in x)
    return str(x)


def csv_text(rows: Iterable[Dict], columns: List[str]) -> str:
    """CSV (header + rows, ``\\n`` line ends) of dicts restricted to ``columns``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------
def vertebra_rows(result: StudyResult) -> List[Dict]:
    """One dict per vertebra with the :data:`VERTEBRA_COLUMNS` keys."""
    rows = []
    for v in result.vertebrae:
        d = v.to_dict()
        c = d.get("centroid_lps") or [None] * 3
        b = d.get("box_xyxy") or [None] * 4
        h = d.get("heights_mm") or {}
        rows.append({
            "study_id": result.study_id, "level": d["level"],
            "structure": THING_CLASSES[v.category_id] if 0 <= v.category_id < len(THING_CLASSES) else v.category_id,
            "score": d["score"], "bmd_mg_cm3": d["bmd"], "category": d["category"],
            "learned_bmd_mg_cm3": d["learned_bmd"], "classical_bmd_mg_cm3": d["classical_bmd"],
            "classical_bmd_3d_mg_cm3": d["classical_bmd_3d"], "bmd_difference_mg_cm3": d["bmd_difference"],
            "trabecular_hu": d["trabecular_hu"], "trabecular_hu_sd": d["trabecular_hu_sd"],
            "trabecular_hu_3d": d["trabecular_hu_3d"], "roi_pixels": d["roi_pixels"],
            "roi_voxels_3d": d["roi_voxels_3d"], "core_3d_reason": d["core_3d_reason"],
            "height_anterior_mm": h.get("anterior"),
            "height_middle_mm": h.get("middle"), "height_posterior_mm": h.get("posterior"),
            "height_loss_pct": d["height_loss_pct"], "genant_grade": d["genant_grade"],
            "centroid_x_mm": c[0], "centroid_y_mm": c[1], "centroid_z_mm": c[2],
            "box_x0": b[0], "box_y0": b[1], "box_x1": b[2], "box_y1": b[3], "qc_flags": d["qc_flags"],
        })
    return rows


def study_row(result_dict: Dict, status: str = "ok", reason: str = "") -> Dict:
    """One :data:`STUDY_COLUMNS` row from ``StudyResult.to_dict()`` (or a failure with only ``study_id``)."""
    p = result_dict.get("patient", {})
    verts = result_dict.get("vertebrae", [])
    return {
        "study_id": result_dict.get("study_id"), "status": status, "n_vertebrae": len(verts),
        "levels": [v["level"] for v in verts if v.get("level")], "acr_levels": p.get("acr_levels") or [],
        "acr_bmd_mg_cm3": p.get("acr_bmd"), "acr_category": p.get("acr_category"),
        "acr_bmd_classical_mg_cm3": p.get("acr_bmd_classical"),
        "acr_category_classical": p.get("acr_category_classical"), "l1_hu": p.get("l1_hu"),
        "hu_category": p.get("hu_category"), "qc_flags": result_dict.get("qc_flags", []), "reason": reason,
    }


def format_table(result: StudyResult) -> str:
    """A fixed-width text table of the vertebrae plus the patient-level lines (for the terminal)."""
    head = f"{'level':<6}{'score':>6}{'BMD':>8}{'learned':>9}{'classic':>9}{'3D':>8}{'HU':>8}{'HU3D':>8}  " \
           f"{'category':<13}flags"
    lines = [f"study {result.study_id}: {len(result.vertebrae)} vertebrae (BMD in mg/cm³)", head]

    def f(x, w, p=1):
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"

    for v in result.vertebrae:
        lines.append(f"{(v.level or '?'):<6}{f(v.score, 6, 2)}{f(v.bmd, 8)}{f(v.learned_bmd, 9)}"
                     f"{f(v.classical_bmd, 9)}{f(v.classical_bmd_3d, 8)}{f(v.trabecular_hu, 8)}"
                     f"{f(v.trabecular_hu_3d, 8)}  {(v.category or '-'):<13}{','.join(v.qc_flags)}")
    p = result.patient
    acr = p.get("acr_bmd")
    lines.append(f"ACR QCT ({'+'.join(p.get('acr_levels') or []) or '-'}): "
                 f"{'-' if acr is None else f'{acr:.1f} mg/cm³'} -> {p.get('acr_category') or 'not available'}"
                 f" | classical: {_opt(p.get('acr_bmd_classical'))} -> {p.get('acr_category_classical') or '-'}")
    lines.append(f"L1 HU: {_opt(p.get('l1_hu'))} -> {p.get('hu_category') or 'not available'}")
    if result.qc_flags:
        lines.append(f"study flags: {', '.join(result.qc_flags)}")
    return "\n".join(lines)


def _opt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def write_json(result: StudyResult, path: str):
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def write_csv(result: StudyResult, path: str):
    atomic_write_text(path, csv_text(vertebra_rows(result), VERTEBRA_COLUMNS))


_COLORS = [(0.90, 0.10, 0.29), (0.24, 0.71, 0.29), (1.0, 0.88, 0.10), (0.0, 0.51, 0.78), (0.96, 0.51, 0.19),
           (0.57, 0.12, 0.71), (0.27, 0.94, 0.94), (0.94, 0.20, 0.90), (0.74, 0.96, 0.05)]


def write_overlay(result: StudyResult, path: str, *, dpi: int = 100):
    """PNG of the mid-sagittal slice with each vertebra's mask coloured, its level, BMD and HU written beside it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    sag = result.sagittal
    img = np.asarray(sag.image)[:, :, 1] if sag is not None else None
    if img is None:
        raise ValueError("the result holds no sagittal image")
    H, W = img.shape
    fig = Figure(figsize=(max(4.0, W / dpi * 1.6), max(4.0, H / dpi)), dpi=dpi)
    ax = fig.add_axes([0, 0.06, 1, 0.9])
    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest", extent=(0, W, H, 0))
    over = np.zeros((H, W, 4), dtype=np.float32)
    for i, v in enumerate(result.vertebrae):
        col = _COLORS[i % len(_COLORS)]
        if v.mask is not None:
            over[v.mask] = (*col, 0.4)
        x0, y0, x1, y1 = v.box_xyxy
        txt = f"{v.level or '?'}  {_opt(v.bmd)} mg/cm³  {_opt(v.trabecular_hu)} HU"
        if v.genant_grade:
            txt += f"  Genant {v.genant_grade}"
        if v.qc_flags:
            txt += "\n! " + ", ".join(v.qc_flags)
        ax.text(x1 + 3, (y0 + y1) / 2, txt, color=col, fontsize=7, va="center", ha="left",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    ax.imshow(over, interpolation="nearest", extent=(0, W, H, 0))
    ax.set_xlim(0, W * 1.6)
    ax.set_ylim(H, 0)
    ax.set_facecolor("black")
    ax.axis("off")
    p = result.patient
    title = f"{result.study_id}  ACR {_opt(p.get('acr_bmd'))} mg/cm³ ({p.get('acr_category') or 'n/a'})  " \
            f"L1 {_opt(p.get('l1_hu'))} HU ({p.get('hu_category') or 'n/a'})"
    fig.text(0.01, 0.97, title, fontsize=8, va="top", color="black")
    if result.qc_flags:
        fig.text(0.01, 0.01, "flags: " + ", ".join(result.qc_flags), fontsize=7, va="bottom", color="darkred")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")


def mask_label_image(result: StudyResult) -> np.ndarray:
    """uint8 ``(H, W)`` sagittal label image of the vertebrae: level label (T11 = 1 … S1 = 8), unnamed ones 9, 10, …"""
    from bmd_d2.data.levels import LEVEL_TO_LABEL

    H, W = np.asarray(result.sagittal.hu).shape[1:]
    lab = np.zeros((H, W), np.uint8)
    extra = 9
    for v in result.vertebrae:
        if v.mask is None:
            continue
        if v.level:
            value = LEVEL_TO_LABEL[v.level]
        else:
            value, extra = extra, extra + 1
        lab[v.mask & (lab == 0)] = value
    return lab


def write_masks_nifti(result: StudyResult, path: str):
    """Label volume (NIfTI, geometry of the source volume) of the measured sagittal masks.

    Values as :func:`mask_label_image`; the masks fill the slab the sagittal measurement covered (the 3 slices:
    ``NUM_SLICES × channel spacing`` mm thick) around the mid-sagittal plane. Needs ``result.volume``.
    """
    import nibabel as nib

    from bmd_d2.data.sagittal import sagittal_mask_to_volume

    vol, sag = result.volume, result.sagittal
    if vol is None or sag is None:
        raise ValueError("the result holds no volume/sagittal image to map the masks into")
    n_slices = np.asarray(sag.hu).shape[0]
    thickness = n_slices * float(np.linalg.norm(np.asarray(sag.transform)[:3, 2]))
    lab = sagittal_mask_to_volume(sag, mask_label_image(result), tuple(vol.data.shape), vol.affine,
                                  thickness_mm=thickness)
    data = np.transpose(np.asarray(lab).astype(np.uint8), (2, 1, 0))  # (K, J, I) -> NIfTI (i, j, k)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine)  # LPS -> RAS
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


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
    from .dicom_outputs import KINDS, OUTPUT_NAMES

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
    ``"sc"`` of :mod:`bmd_d2.measure.dicom_outputs`), then ``result.json`` again with ``outputs`` filled in and
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
    kinds = [k for k in ("seg", "sr", "sc") if k in set(dicom)]
    if kinds:
        from .dicom_outputs import OUTPUT_NAMES, DicomOutputsUnavailable, write_dicom_outputs

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
    from bmd_d2.errors import BMDError
    from bmd_d2.utils.logs import redact

    msg = " ".join(str(e).split())
    return redact(msg) if isinstance(e, BMDError) else f"{type(e).__name__}: {redact(msg, third_party=True)}"


def _output_failed(result: StudyResult, name: str, message: str):
    from bmd_d2.utils.logs import redact

    # the writers' messages may quote a source header's value (e.g. a malformed birth date): never keep it
    message = redact(" ".join(str(message).split()), third_party=True)
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
