"""The report picture (overlay.png, also the DICOM SC; issue 20 item 5): cropped spine, outlines, labels, table, no
overlapping text, readable fonts, RGB 8-bit of a sensible size, and the old contract for empty results."""
import json
import os

import numpy as np
import pytest

from bmd_d2 import reports
from bmd_d2.data.sagittal import SagittalImage
from bmd_d2.measure.result import QC_FLAGS, StudyResult, VertebraResult
from bmd_d2.reports import overlay as ov

LEVELS = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]


def _result(n=8, gap=34, height=26, flags=(), vertebra_flags=(), study_id="pic1", x0=250):
    """A synthetic result: ``n`` bodies down a 512² slice, ``gap`` px apart (small gaps crowd the labels)."""
    H = W = 512
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :, 1] = (np.add.outer(np.arange(H), np.arange(W)) % 200).astype(np.uint8)
    sag = SagittalImage(image=img, hu=np.zeros((3, H, W), np.float32), transform=np.eye(4), spacing=1.0)
    verts = []
    for i in range(n):
        y0 = 60 + i * gap
        box = [float(x0 + 3 * i), float(y0), float(x0 + 3 * i + 40), float(y0 + height)]
        mask = np.zeros((H, W), bool)
        mask[int(box[1]) + 1:int(box[3]) - 1, int(box[0]) + 1:int(box[2]) - 1] = True
        verts.append(VertebraResult(
            level=LEVELS[i % len(LEVELS)] if i < len(LEVELS) else None, category_id=int(i == 7), score=0.9,
            box_xyxy=box, mask=mask if i != 2 else None, learned_bmd=100.0 + i, trabecular_hu=110.0 + i,
            bmd=100.0 + i, category="osteopenia", genant_grade=i % 4 if i else None,
            qc_flags=list(vertebra_flags) if i % 2 else []))
    patient = {"acr_levels": ["L1", "L2"], "acr_bmd": 102.5, "acr_category": "osteopenia", "l1_hu": 112.0,
               "hu_category": "indeterminate", "primary_bmd": "learned", "acr_bmd_classical": 104.0,
               "acr_category_classical": "osteopenia"}
    return StudyResult(study_id=study_id, vertebrae=verts, patient=patient, qc_flags=list(flags), sagittal=sag)


def _texts(fig):
    """``(Text, Bbox)`` of every non-empty text in the figure, drawn by Agg."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    found = list(fig.texts) + [t for ax in fig.axes for t in ax.texts]
    return [(t, t.get_window_extent(r)) for t in found if t.get_text().strip()]


def _assert_no_overlap(fig):
    items = _texts(fig)
    W, H = fig.canvas.get_width_height()
    for i, (t, b) in enumerate(items):
        assert b.x0 >= -0.5 and b.y0 >= -0.5 and b.x1 <= W + 0.5 and b.y1 <= H + 0.5, t.get_text()
        assert t.get_fontsize() >= ov.MIN_FONT_PT, t.get_text()
        for u, c in items[i + 1:]:
            inter_w = min(b.x1, c.x1) - max(b.x0, c.x0)
            inter_h = min(b.y1, c.y1) - max(b.y0, c.y0)
            assert inter_w <= 0.5 or inter_h <= 0.5, (t.get_text(), u.get_text(), b, c)
    return items


@pytest.mark.parametrize("gap", [34, 3])  # 3 px: the bodies' centres are closer than a label is high
def test_no_text_overlaps_and_fonts_are_readable(gap):
    res = _result(gap=gap, vertebra_flags=["vertebral_height_loss"])
    fig = ov.overlay_figure(res)
    items = _assert_no_overlap(fig)
    assert len(items) > 8 + 8 + 4
    labels = [b for t, b in items if t in fig.axes[0].texts]
    assert len(labels) == len(res.vertebrae)
    if gap == 3:  # the labels were moved apart, each still joined to its body by a leader line
        centres = sorted((b.y0 + b.y1) / 2 for b in labels)
        assert min(np.diff(centres)) >= labels[0].height - 0.5
        assert len(fig.axes[0].lines) == len(res.vertebrae)


def test_every_vertebra_has_a_label_beside_it_and_a_table_row():
    res = _result(vertebra_flags=["vertebral_height_loss", "low_confidence"])
    fig = ov.overlay_figure(res)
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert [t.get_text() for t in labels] == [v.level or "?" for v in res.vertebrae]
    fig_texts = [t.get_text() for t in fig.texts]
    for v, t in zip(res.vertebrae, labels):
        x, _ = t.get_position()
        assert x < v.box_xyxy[0] and t.get_horizontalalignment() == "right"  # anterior side, away from the canal
        assert f"{v.bmd:.1f}" in " ".join(fig_texts) and f"{v.trabecular_hu:.1f}" in " ".join(fig_texts)
    rows = [s for s in fig_texts if s.strip().startswith(f"{res.vertebrae[1].bmd:.1f}")]
    assert len(rows) == 1 and "HL" in rows[0] and "LC" in rows[0] and "osteopenia" in rows[0]
    assert sum(s == (v.level or "?") for v in res.vertebrae for s in fig_texts) == len(res.vertebrae)
    legend = " ".join(s for s in fig_texts if "=" in s)
    assert "HL=vertebral_height_loss" in legend and "LC=low_confidence" in legend
    header = " ".join(fig_texts[:6])
    assert "pic1" in header and "102.5 mg/cm³ -> osteopenia" in header and "112.0 -> indeterminate" in header


def test_flag_codes_are_unique_and_cover_every_flag():
    codes = {f: ov.flag_code(f) for f in QC_FLAGS}
    assert len(set(codes.values())) == len(codes)
    assert all(1 <= len(c) <= 4 for c in codes.values())


def test_crop_contains_every_box_with_square_pixels():
    res = _result()
    x0, y0, x1, y1 = ov.crop_box(res, res.sagittal.image.shape[:2])
    boxes = np.array([v.box_xyxy for v in res.vertebrae])
    assert x0 <= boxes[:, 0].min() and y0 <= boxes[:, 1].min() and x1 >= boxes[:, 2].max() and y1 >= boxes[:, 3].max()
    assert (x1 - x0) < 200 and (y1 - y0) < 330  # cropped, not the whole 512² slice
    fig = ov.overlay_figure(res)
    fig.canvas.draw()
    ax = fig.axes[0]
    (lx0, lx1), (ly1, ly0) = ax.get_xlim(), ax.get_ylim()
    assert lx0 <= boxes[:, 0].min() and lx1 >= boxes[:, 2].max() and ly0 <= boxes[:, 1].min()
    assert ly1 >= boxes[:, 3].max()
    bb = ax.get_window_extent()
    assert bb.width / (lx1 - lx0) == pytest.approx(bb.height / (ly1 - ly0), rel=0.01)  # square pixels
    assert len(ax.collections) >= len(res.vertebrae) - 1  # one outline per mask (vertebra 2 has none: its box)
    assert len(ax.patches) == 1


def test_spread_positions_keeps_order_spacing_and_bounds():
    pos = ov.spread_positions([50, 51, 52, 10, 200, 199], 10.0, 0.0, 205.0)
    order = np.argsort([50, 51, 52, 10, 200, 199], kind="stable")
    placed = [pos[i] for i in order]
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(placed, placed[1:]))
    assert min(pos) >= 0.0 and max(pos) <= 205.0
    assert pos[3] == 10.0 and ov.spread_positions([5.0], 10.0, 0.0, 100.0) == [5.0]


def test_png_is_rgb_8bit_of_the_documented_size(tmp_path):
    from PIL import Image

    path = str(tmp_path / "overlay.png")
    ov.write_overlay(_result(), path)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        a = np.asarray(im)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    H, W = a.shape[:2]
    assert 600 <= W <= 1600 and ov.MIN_HEIGHT_PX <= H <= 1200
    assert not [p for p in os.listdir(tmp_path) if p != "overlay.png"]


def test_long_flag_lists_wrap_instead_of_overlapping():
    many = sorted(QC_FLAGS)
    fig = ov.overlay_figure(_result(flags=many, vertebra_flags=many))
    items = _assert_no_overlap(fig)
    W = fig.canvas.get_width_height()[0]
    assert W <= 1600
    flag_lines = [t.get_text() for t, _ in items if t.get_text().startswith(("study flags", "  "))]
    assert len(flag_lines) > 3 and all(len(s) <= ov.PANEL_CHARS for s in flag_lines)
    shown = " ".join(t.get_text() for t, _ in items)
    assert all(f in shown.replace("\n", " ") for f in many)  # every study flag and every code's meaning


def test_zero_vertebrae_draws_the_whole_slice(tmp_path):
    res = _result(n=0, flags=["no_vertebrae_detected"])
    fig = ov.overlay_figure(res)
    _assert_no_overlap(fig)
    assert ov.crop_box(res, (512, 512)) == (0, 0, 512, 512)
    assert any("no vertebra detected" in t.get_text() for t in fig.texts)
    paths = reports.write_study(res, str(tmp_path))
    assert os.path.isfile(paths["overlay"])


def test_no_sagittal_image_fails_only_the_overlay(tmp_path):
    res = _result(n=0)
    res.sagittal = None
    with pytest.raises(ValueError, match="no sagittal image"):
        ov.write_overlay(res, str(tmp_path / "x.png"))
    paths = reports.write_study(res, str(tmp_path))
    assert "overlay" not in paths and not os.path.exists(tmp_path / "overlay.png")
    d = json.loads(open(paths["json"]).read())
    assert "overlay" in d["outputs"]["failed"] and "output_not_written" in d["qc_flags"]


def test_dpi_scales_the_picture(tmp_path):
    from PIL import Image

    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    ov.write_overlay(_result(), a)
    ov.write_overlay(_result(), b, dpi=150)
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ib.size[0] == pytest.approx(ia.size[0] * 1.5, rel=0.03)
        assert ib.size[1] == pytest.approx(ia.size[1] * 1.5, rel=0.03)
