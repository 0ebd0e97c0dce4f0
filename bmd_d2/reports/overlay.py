"""The overlay PNG: the mid-sagittal slice with each vertebra's mask coloured and its level, BMD and HU beside it."""
import numpy as np

from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.files import atomic_path

from .tables import one_decimal

# one colour per vertebra (cycled), RGB 0-1; the DICOM SEG's segment colours are the same
VERTEBRA_COLORS = [(0.90, 0.10, 0.29), (0.24, 0.71, 0.29), (1.0, 0.88, 0.10), (0.0, 0.51, 0.78),
                   (0.96, 0.51, 0.19), (0.57, 0.12, 0.71), (0.27, 0.94, 0.94), (0.94, 0.20, 0.90),
                   (0.74, 0.96, 0.05)]


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
        col = VERTEBRA_COLORS[i % len(VERTEBRA_COLORS)]
        if v.mask is not None:
            over[v.mask] = (*col, 0.4)
        x0, y0, x1, y1 = v.box_xyxy
        txt = f"{v.level or '?'}  {one_decimal(v.bmd)} mg/cm³  {one_decimal(v.trabecular_hu)} HU"
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
    title = f"{result.study_id}  ACR {one_decimal(p.get('acr_bmd'))} mg/cm³ ({p.get('acr_category') or 'n/a'})  " \
            f"L1 {one_decimal(p.get('l1_hu'))} HU ({p.get('hu_category') or 'n/a'})"
    fig.text(0.01, 0.97, title, fontsize=8, va="top", color="black")
    if result.qc_flags:
        fig.text(0.01, 0.01, "flags: " + ", ".join(result.qc_flags), fontsize=7, va="bottom", color="darkred")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
