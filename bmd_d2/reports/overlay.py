"""The report picture (``overlay.png``, also the DICOM SC): the spine, each level outlined and labelled, and a table.

Layout, left to right on a black background (what a radiology viewer shows around an image):

* **image panel**: the mid-sagittal slice cropped to the union of the vertebra boxes plus :data:`MARGIN_MM` (the
  whole slice when nothing was detected), scaled with square pixels so that it fits :data:`IMAGE_MAX_PX`; each
  vertebra's mask outlined in its :data:`VERTEBRA_COLORS` colour (its box, dashed, when it has no mask); the level
  labels in a column added on the anterior side (away from the spinal canal: columns run anterior → posterior; the
  slice shows through it where it reaches, black beyond), moved apart vertically where bodies are close (at least
  one label height between two labels), each joined to its body by a thin leader line;
* **text panel** (monospaced, :data:`PANEL_CHARS` characters wide): the study id, the patient-level result (ACR
  value and category of the primary BMD, the other BMD beside it, L1 trabecular HU and its category), the study
  flags (wrapped to the panel width), then one table row per vertebra (level, BMD mg/cm³, ACR category, HU, Genant
  grade, flag codes) and the legend of the flag codes used (:data:`FLAG_CODES`).

No text overlaps another; every font is at least :data:`MIN_FONT_PT` pt. At ``dpi=100`` the picture is 8-bit RGB,
at most ``2 * PAD_PX + IMAGE_MAX_PX[0] + GAP_PX + panel`` ≈ 1090 px wide and at least ``MIN_HEIGHT_PX`` high (it
grows downwards with long flag lists); other ``dpi`` values scale it. The picture shows nothing about the patient
but the study id it was given.
"""
import textwrap
from typing import Dict, List, Sequence, Tuple

import numpy as np

from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.files import atomic_path

from .tables import one_decimal

# one colour per vertebra (cycled), RGB 0-1; the DICOM SEG's segment colours are the same
VERTEBRA_COLORS = [(0.90, 0.10, 0.29), (0.24, 0.71, 0.29), (1.0, 0.88, 0.10), (0.0, 0.51, 0.78),
                   (0.96, 0.51, 0.19), (0.57, 0.12, 0.71), (0.27, 0.94, 0.94), (0.94, 0.20, 0.90),
                   (0.74, 0.96, 0.05)]

# short codes of the vertebra flags in the table (a flag not listed gets the initials of its words); the legend
# under the table spells out the ones used
FLAG_CODES: Dict[str, str] = {
    "vertebral_height_loss": "HL", "low_confidence": "LC", "metal": "MET", "very_dense": "DNS",
    "large_learned_classical_difference": "DIF", "truncated_by_image_edge": "EDG", "roi_too_small": "ROI",
    "no_3d_core": "N3D", "implausible_hu": "IHU", "implausible_size": "ISZ", "level_after_gap": "GAP",
    "above_labelled_range": "ABV", "possible_transitional_anatomy": "TRA", "contrast_enhanced": "CON",
    "levels_unanchored": "LUA", "levels_unknown": "LUK",
}

MARGIN_MM = 15.0                 # around the union of the vertebra boxes
IMAGE_MAX_PX = (520, 640)        # image panel at most (width, height), label column included, at 100 dpi
MAX_ZOOM = 4.0                   # display pixels per image pixel at 100 dpi, at most
PAD_PX, GAP_PX = 12, 16          # figure border; between image panel and text panel (100 dpi)
MIN_HEIGHT_PX = 480              # the picture is at least this high (100 dpi)
PANEL_CHARS = 64                 # text panel width in characters
MIN_FONT_PT = 9
FONT_PT, TITLE_PT, LABEL_PT = 10, 12, 11
MONO_ASPECT = 0.602              # DejaVu Sans Mono advance width / font size
LINE_SPACING = 1.45              # text line pitch / font size
LEADER_PX = 14                   # label column to the most anterior body (100 dpi)
TEXT_COLOR, FLAG_COLOR, DIM_COLOR = "white", (1.0, 0.72, 0.30), (0.70, 0.70, 0.70)
_MONO = "DejaVu Sans Mono"


def _pt_px(pt: float, dpi: int) -> float:
    return pt * dpi / 72.0


def _char_px(pt: float, dpi: int) -> float:
    return _pt_px(pt, dpi) * MONO_ASPECT


def _line_px(pt: float, dpi: int) -> float:
    return _pt_px(pt, dpi) * LINE_SPACING


def flag_code(flag: str) -> str:
    """The table's short code of a vertebra flag (:data:`FLAG_CODES`, else the initials of its words)."""
    return FLAG_CODES.get(flag) or "".join(w[:1] for w in flag.split("_")).upper()


def crop_box(result: StudyResult, shape: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` image pixels shown: the union of the vertebra boxes plus :data:`MARGIN_MM`, inside the
    image (the whole image when there is no vertebra); every box lies inside it."""
    H, W = shape
    boxes = np.asarray([v.box_xyxy for v in result.vertebrae], dtype=float).reshape(-1, 4)
    if not len(boxes):
        return 0, 0, W, H
    m = MARGIN_MM / float(getattr(result.sagittal, "spacing", 1.0) or 1.0)
    x0, y0 = np.floor(boxes[:, :2].min(axis=0) - m)
    x1, y1 = np.ceil(boxes[:, 2:].max(axis=0) + m)
    return int(max(0, x0)), int(max(0, y0)), int(min(W, x1)), int(min(H, y1))


def spread_positions(wanted: Sequence[float], spacing: float, low: float, high: float) -> List[float]:
    """Positions as close to ``wanted`` as possible, in the same order, at least ``spacing`` apart, in [low, high]
    (greedy: pushed down past the previous one, then back up from ``high``; ``low`` wins if they cannot all fit)."""
    order = np.argsort(np.asarray(wanted, dtype=float), kind="stable")
    pos = [float(wanted[i]) for i in order]
    for k in range(len(pos)):
        pos[k] = max(pos[k], low if k == 0 else pos[k - 1] + spacing)
    for k in range(len(pos) - 1, -1, -1):
        pos[k] = min(pos[k], high if k == len(pos) - 1 else pos[k + 1] - spacing)
    for k in range(len(pos)):
        pos[k] = max(pos[k], low if k == 0 else pos[k - 1] + spacing)
    out = [0.0] * len(pos)
    for k, i in enumerate(order):
        out[i] = pos[k]
    return out


def _header_lines(result: StudyResult) -> List[Tuple[str, object, float, str]]:
    """``(text, colour, font pt, weight)`` lines above the table, each at most :data:`PANEL_CHARS` characters."""
    p = result.patient
    primary = p.get("primary_bmd") or "learned"
    other, other_key = ("classical", "_classical") if primary != "classical" else ("learned", "_learned")
    levels = "+".join(p.get("acr_levels") or []) or "-"
    acr = p.get("acr_bmd")
    title_chars = int(PANEL_CHARS * FONT_PT / TITLE_PT)  # the title's larger font: fewer characters fit
    lines = [(f"bmd_d2  {result.study_id}"[:title_chars], TEXT_COLOR, TITLE_PT, "bold")]
    wrap = [
        (f"ACR QCT ({levels}): {'-' if acr is None else f'{acr:.1f} mg/cm³'} -> "
         f"{p.get('acr_category') or 'not available'}  ({primary} BMD)", TEXT_COLOR),
        (f"{other} BMD: {one_decimal(p.get('acr_bmd' + other_key))} -> "
         f"{p.get('acr_category' + other_key) or '-'}", DIM_COLOR),
        (f"L1 trabecular HU: {one_decimal(p.get('l1_hu'))} -> {p.get('hu_category') or 'not available'}", TEXT_COLOR),
        ("study flags: " + (", ".join(result.qc_flags) if result.qc_flags else "none"),
         FLAG_COLOR if result.qc_flags else DIM_COLOR),
    ]
    for text, color in wrap:
        for part in textwrap.wrap(text, PANEL_CHARS, subsequent_indent="  ", break_on_hyphens=False):
            lines.append((part, color, FONT_PT, "normal"))
    return lines


_LEVEL_CHARS = 6  # the level column; drawn on its own, in the vertebra's colour
_COLUMNS = f"{'level':<{_LEVEL_CHARS}}{'BMD mg/cm³':>11}  {'ACR category':<13}{'HU':>6}  {'Genant':<6}  flags"
_FLAG_COL = len(_COLUMNS) - len("flags")


def _row_lines(v) -> List[str]:
    """A vertebra's table row after the level column: values, then the flag codes wrapped onto further lines."""
    genant = "-" if v.genant_grade is None else str(v.genant_grade)
    head = f"{one_decimal(v.bmd):>11}  {(v.category or '-'):<13}{one_decimal(v.trabecular_hu):>6}  {genant:<6}  "
    codes = textwrap.wrap(" ".join(flag_code(f) for f in v.qc_flags), PANEL_CHARS - _FLAG_COL) or ["-"]
    indent = " " * (_FLAG_COL - _LEVEL_CHARS)
    return [head + codes[0]] + [indent + c for c in codes[1:]]


def _legend(result: StudyResult) -> List[str]:
    used = sorted({f for v in result.vertebrae for f in v.qc_flags}, key=flag_code)
    if not used:
        return []
    text = "codes: " + "; ".join(f"{flag_code(f)}={f}" for f in used)
    return textwrap.wrap(text, PANEL_CHARS, subsequent_indent="  ", break_on_hyphens=False)


def overlay_figure(result: StudyResult, *, dpi: int = 100):
    """The report picture as a matplotlib ``Figure`` with an Agg canvas (see the module docstring for the layout).

    Raises:
        ValueError: the result holds no sagittal image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    import matplotlib.patheffects as pe

    sag = result.sagittal
    img = np.asarray(sag.image)[:, :, 1] if sag is not None else None
    if img is None:
        raise ValueError("the result holds no sagittal image")
    k = dpi / 100.0
    cx0, cy0, cx1, cy1 = crop_box(result, img.shape)
    verts = list(result.vertebrae)
    labels = [v.level or "?" for v in verts]
    label_w = max((len(t) for t in labels), default=0) * _char_px(LABEL_PT, dpi)
    gutter = (label_w + LEADER_PX * k + 4 * k) if verts else 0.0  # display px left of the most anterior body
    anterior = min((float(v.box_xyxy[0]) for v in verts), default=float(cx0))
    core_w = max(1.0, cx1 - min(cx0, anterior))
    zoom = min(IMAGE_MAX_PX[1] * k / max(1, cy1 - cy0), (IMAGE_MAX_PX[0] * k - gutter) / core_w, MAX_ZOOM * k)
    left = min(float(cx0), anterior - gutter / zoom)  # data x of the panel's left edge (may lie left of the image)
    img_w, img_h = int(round((cx1 - left) * zoom)), int(round((cy1 - cy0) * zoom))
    zoom_x, zoom_y = img_w / (cx1 - left), img_h / (cy1 - cy0)  # equal up to the rounding to whole pixels

    header, legend = _header_lines(result), _legend(result)
    rows = [_row_lines(v) for v in verts]
    line, pad, gap = _line_px(FONT_PT, dpi), PAD_PX * k, GAP_PX * k
    panel_w = PANEL_CHARS * _char_px(FONT_PT, dpi)
    text_h = sum(_line_px(pt, dpi) for _, _, pt, _ in header) + line * (1.5 + 1 + sum(len(r) for r in rows)
                                                                      + (0 if rows else 1) + 0.5 + len(legend))
    W = int(np.ceil(pad + img_w + gap + panel_w + pad))
    H = int(np.ceil(max(MIN_HEIGHT_PX * k, img_h + 2 * pad, text_h + 2 * pad)))
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)

    ax = fig.add_axes([pad / W, 1 - (pad + img_h) / H, img_w / W, img_h / H])
    ax.set_facecolor("black")
    ix0 = max(0, int(np.floor(left)))  # the label column shows the image too where the slice reaches
    ax.imshow(img[cy0:cy1, ix0:cx1], cmap="gray", vmin=0, vmax=255, interpolation="bilinear",
              extent=(ix0, cx1, cy1, cy0))
    ax.set_xlim(left, cx1)
    ax.set_ylim(cy1, cy0)
    ax.axis("off")
    wanted = [(float(v.box_xyxy[1]) + float(v.box_xyxy[3])) / 2 for v in verts]
    half = _line_px(LABEL_PT, dpi) / 2 / zoom_y
    ys = spread_positions(wanted, 2 * half, cy0 + half, cy1 - half)
    label_x = anterior - (LEADER_PX * k) / zoom_x
    outline = [pe.withStroke(linewidth=3 * k, foreground="black")]
    for i, v in enumerate(verts):
        col = VERTEBRA_COLORS[i % len(VERTEBRA_COLORS)]
        x0, y0, x1, y1 = (float(c) for c in v.box_xyxy)
        if v.mask is not None and np.any(v.mask[cy0:cy1, cx0:cx1]):
            m = np.asarray(v.mask[cy0:cy1, cx0:cx1], dtype=float)
            ax.contour(np.arange(cx0, cx1) + 0.5, np.arange(cy0, cy1) + 0.5, m, levels=[0.5], colors=[col],
                       linewidths=1.5 * k)
        else:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=col, linestyle="--",
                                   linewidth=1.2 * k))
        ax.plot([label_x + 2 * k / zoom_x, x0], [ys[i], (y0 + y1) / 2], color=col, linewidth=0.8 * k)
        ax.text(label_x, ys[i], labels[i], color=col, fontsize=LABEL_PT, family=_MONO, weight="bold",
                ha="right", va="center", path_effects=outline)

    x = (pad + img_w + gap) / W
    y = H - pad
    for text, color, pt, weight in header:
        fig.text(x, y / H, text, color=color, fontsize=pt, family=_MONO, weight=weight, va="top", ha="left")
        y -= _line_px(pt, dpi)
    y -= 0.5 * line
    fig.text(x, y / H, _COLUMNS, color=DIM_COLOR, fontsize=FONT_PT, family=_MONO, va="top", ha="left")
    y -= line
    if not rows:
        fig.text(x, y / H, "no vertebra detected", color=FLAG_COLOR, fontsize=FONT_PT, family=_MONO, va="top")
        y -= line
    level_dx = _LEVEL_CHARS * _char_px(FONT_PT, dpi) / W
    for i, row in enumerate(rows):
        fig.text(x, y / H, labels[i], color=VERTEBRA_COLORS[i % len(VERTEBRA_COLORS)], fontsize=FONT_PT,
                 family=_MONO, weight="bold", va="top")
        for part in row:
            fig.text(x + level_dx, y / H, part, color=TEXT_COLOR, fontsize=FONT_PT, family=_MONO, va="top")
            y -= line
    y -= 0.5 * line
    for part in legend:
        fig.text(x, y / H, part, color=DIM_COLOR, fontsize=FONT_PT, family=_MONO, va="top", ha="left")
        y -= line
    return fig


def write_overlay(result: StudyResult, path: str, *, dpi: int = 100):
    """Write the report picture (:func:`overlay_figure`) as an 8-bit RGB PNG, atomically.

    Raises:
        ValueError: the result holds no sagittal image (:func:`bmd_d2.reports.study.write_study` records the failure
            and keeps the measurement).
    """
    from PIL import Image

    fig = overlay_figure(result, dpi=dpi)
    fig.canvas.draw()
    rgb = np.array(np.asarray(fig.canvas.buffer_rgba())[:, :, :3], dtype=np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, "RGB").save(tmp, format="PNG")
