"""Tables of a measured study: the per-vertebra CSV, the batch's per-study rows, the terminal table and result.json.

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
from typing import Dict, Iterable, List

import numpy as np

from bmd_d2.levels import THING_CLASSES
from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.files import atomic_write_text

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


def _fmt(x) -> str:
    """One CSV cell: None and non-finite floats empty, floats to 6 significant digits, lists ``;``-joined."""
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
                 f" | classical: {one_decimal(p.get('acr_bmd_classical'))} -> {p.get('acr_category_classical') or '-'}")
    lines.append(f"L1 HU: {one_decimal(p.get('l1_hu'))} -> {p.get('hu_category') or 'not available'}")
    if result.qc_flags:
        lines.append(f"study flags: {', '.join(result.qc_flags)}")
    return "\n".join(lines)


def one_decimal(x) -> str:
    """``x`` with one decimal, or ``-`` when it is None (table and overlay labels)."""
    return "-" if x is None else f"{x:.1f}"


def write_json(result: StudyResult, path: str):
    """``result.json``: :meth:`StudyResult.to_dict` as strict JSON (no NaN), indented, written atomically."""
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def write_csv(result: StudyResult, path: str):
    """``vertebrae.csv``: :func:`vertebra_rows` in the :data:`VERTEBRA_COLUMNS`, written atomically."""
    atomic_write_text(path, csv_text(vertebra_rows(result), VERTEBRA_COLUMNS))
