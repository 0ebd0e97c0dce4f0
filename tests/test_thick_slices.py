"""3-D trabecular core on thick, overlapping and gapped slices (issue 16 point 6), on phantoms written as DICOM.

Every series is a tiny phantom (96² of 2 mm pixels) written with ``write_dicom_series`` and read back with
``load_volume``, measured with its ground-truth masks and the phantom's own calibration, like
``tests/test_measure_classical.py``. Reference figures (L1–L4, seeds 1–24, DICOM, random noise; bias / MAE / max |error|
of ``trabecular_hu_3d`` against the phantom's ``trabecular_hu``, HU):

=============================  ======================  ====================================
series                         3-D core                without CORE_MIN_EROSION_SLICES
=============================  ======================  ====================================
3 mm every 3 mm (baseline)     −0.2 / 2.9 / 17.6       (the same ROI)
5 mm every 4.25 mm (overlap)   +0.8 / 2.8 / 17.5       (the same ROI)
5 mm every 5 mm                +1.1 / 3.4 / 14.8       +3.8 / 4.7 / 19.5
3 mm every 5 mm (gaps)         +1.8 / 3.9 / 16.8       +5.2 / 6.0 / 24.6
=============================  ======================  ====================================

The bounds below are the 3 mm test's (max 18 HU per vertebra, MAE 5 HU) and a bias bound of 3 HU: a core that blends
in the endplate's slice reads 3.8–5.2 HU high.
"""
import os
import re
import sys

import numpy as np
import pydicom
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import Volume, load_volume
from bmd_d2.phantoms import PhantomOptions, generate_study, write_dicom_series
from bmd_d2 import reports
from bmd_d2.measure.classical import (CORE_3D_REASONS, Calibration, core_points_lps, erode_roi_ellipse, measure_core_3d,
                                      slice_thickness_mm)
from bmd_d2.measure.predictor import measure_detections

sys.path.insert(0, os.path.dirname(__file__))
from test_measure_classical import _gt_detections, truth_sagittal  # noqa: E402

QUICK = os.path.join(os.path.dirname(__file__), "..", "configs", "quick_schedules",
                     "bmd_rcnn_MFEFPN_instant_test.yaml")
LUMBAR = ("L1", "L2", "L3", "L4")
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """``get(seed, thickness, spacing)`` → ``(study, volume loaded from its DICOM files, file paths)``, cached."""
    root = tmp_path_factory.mktemp("thick")
    cache = {}

    def get(seed: int, thickness: float, spacing: float):
        key = (seed, thickness, spacing)
        if key not in cache:
            # generator v4: the bounds below were measured on it (v5's physics gives 80 kVp scanners a 1.7 HU per
            # mg/cm³ mineral slope, which scales the endplate-to-core contrast these cuts sample)
            st = generate_study(seed, PhantomOptions.tiny(metal=False, fracture=False, scoliosis=False,
                                                          slice_thickness=thickness, slice_spacing=spacing,
                                                          generator_version=4))
            files = write_dicom_series(st, root / f"s{seed}_{thickness:g}_{spacing:g}")
            cache[key] = (st, load_volume(str(files[0].parent)), files)
        return cache[key]

    return get


def _measure(st, vol, cfg=None):
    cfg = cfg or get_bmd_cfg(QUICK)
    sag = truth_sagittal(st, vol, cfg)
    dets, truth = _gt_detections(st, sag)
    cal = Calibration(st.params["calib_b"], st.params["calib_a"], "phantom")
    return measure_detections(dets, sag, cfg, volume=vol, calibration=cal, study_id=st.study_id), truth, sag, dets


def _lateral_samples(sag, half_width_mm: float) -> int:
    """Lateral positions per ROI pixel in the core (``core_points_lps``: ±half width in channel steps)."""
    return 2 * int(np.floor(half_width_mm / np.linalg.norm(sag.transform[:3, 2]) + 1e-9)) + 1


@pytest.mark.parametrize("thickness,spacing,deeper", [(3.0, 3.0, False), (5.0, 4.25, False), (5.0, 5.0, True),
                                                      (3.0, 5.0, True)],
                         ids=["3mm_baseline", "5mm_every_4.25mm_overlap", "5mm_contiguous", "3mm_every_5mm_gaps"])
def test_core_on_thick_slices_matches_truth(series, thickness, spacing, deeper):
    """Every L1–L4 gets a 3-D value, within the 3 mm series' error bounds of the phantom's trabecular HU."""
    cfg = get_bmd_cfg(QUICK)
    errors = []
    for seed in SEEDS:
        st, vol, _ = series(seed, thickness, spacing)
        assert vol.spacing[0] == pytest.approx(spacing) and float(vol.meta["SliceThickness"]) == thickness
        res, truth, sag, _ = _measure(st, vol, cfg)
        assert [v.level for v in res.vertebrae] == [t["level"] for t in truth]
        lateral = _lateral_samples(sag, cfg.MEASURE.CORE_HALF_WIDTH_MM)
        for v, t in zip(res.vertebrae, truth):
            if v.level not in LUMBAR:
                continue
            assert v.trabecular_hu_3d is not None, (seed, v.level, v.core_3d_reason, v.core_3d_detail)
            assert v.core_3d_reason is None and v.core_3d_detail == "" and "no_3d_core" not in v.qc_flags
            # up to 4 mm slices the core extrudes the sagittal ROI itself (less, in a few lateral layers, the dense rim
            # of an endplate the thick slices smear in: MEASURE.RIM_TRIM_MM); 5 mm spacing needs a deeper one
            full = v.roi_pixels // 3 * lateral
            if deeper:
                assert v.roi_voxels_3d < full
            else:
                assert 0.98 * full <= v.roi_voxels_3d <= full
            errors.append(v.trabecular_hu_3d - t["trabecular_hu"])
    e = np.array(errors)
    assert e.size == len(LUMBAR) * len(SEEDS)
    assert np.abs(e).max() < 18.0 and np.abs(e).mean() < 5.0 and abs(e.mean()) < 3.0, e


@pytest.mark.parametrize("thickness", [5.0, 3.0])
def test_five_mm_spacing_core_keeps_clear_of_the_endplate_slice(series, thickness):
    """At 5 mm spacing the sagittal ROI's erosion (5.5 mm) lets the core blend in the slice nearest the endplate; the
    1.25-spacing core (6.25 mm) removes that excess (seeds 1–24: +3.8 → +1.1 HU at 5 mm, +5.2 → +1.8 HU with gaps)."""
    shallow = get_bmd_cfg(QUICK, ["MEASURE.CORE_MIN_EROSION_SLICES", "0.0"])
    bias = {}
    for name, cfg in (("default", get_bmd_cfg(QUICK)), ("shallow", shallow)):
        e = []
        for seed in SEEDS:
            st, vol, _ = series(seed, thickness, 5.0)
            res, truth, _, _ = _measure(st, vol, cfg)
            e += [v.trabecular_hu_3d - t["trabecular_hu"] for v, t in zip(res.vertebrae, truth) if v.level in LUMBAR]
        bias[name] = float(np.mean(e))
    assert bias["shallow"] - bias["default"] > 1.5, bias
    assert abs(bias["default"]) < abs(bias["shallow"]), bias


def test_slices_thicker_than_the_limit_say_so_per_vertebra(series):
    """7 mm slices (contiguous or overlapping) get no core, each vertebra says why; the sagittal value stays."""
    for spacing in (7.0, 3.5):
        st, vol, _ = series(1, 7.0, spacing)
        res, _, _, _ = _measure(st, vol)
        assert len(res.vertebrae) >= 6
        for v in res.vertebrae:
            assert v.trabecular_hu_3d is None and v.roi_voxels_3d == 0 and v.classical_bmd_3d is None
            assert v.core_3d_reason == "slices_too_thick" and "no_3d_core" in v.qc_flags
            assert v.core_3d_detail == ("slices 7 mm thick (SliceThickness or spacing) > "
                                        "MEASURE.CORE_MAX_SPACING_MM 5 mm")
            if v.level in LUMBAR:  # (T11's ROI may be too small at 6.5 mm erosion: roi_too_small)
                assert v.trabecular_hu is not None and v.classical_bmd is not None
    # the reason reaches result.json and vertebrae.csv
    saved = res.to_dict()["vertebrae"]
    assert {d["core_3d_reason"] for d in saved} == {"slices_too_thick"}
    assert all(d["core_3d_detail"].startswith("slices 7 mm thick") for d in saved)
    assert [r["core_3d_reason"] for r in reports.vertebra_rows(res)] == ["slices_too_thick"] * len(saved)
    assert "core_3d_reason" in reports.VERTEBRA_COLUMNS and set(CORE_3D_REASONS) >= {"slices_too_thick"}
    # the old limit (3.5 mm) still works as a config value: 5 mm slices every 4.25 mm are then too thick
    st, vol, _ = series(1, 5.0, 4.25)
    res, _, _, _ = _measure(st, vol, get_bmd_cfg(QUICK, ["MEASURE.CORE_MAX_SPACING_MM", "3.5"]))
    assert {v.core_3d_reason for v in res.vertebrae} == {"slices_too_thick"}
    assert res.vertebrae[0].core_3d_detail == ("slices 5 mm thick (SliceThickness or spacing) > "
                                               "MEASURE.CORE_MAX_SPACING_MM 3.5 mm")


def test_core_cut_by_a_short_field_of_view_is_outside_volume(series, tmp_path):
    """A reconstruction whose field of view ends 3 mm beside the mid-sagittal plane: the 3 sagittal slices (±1 mm)
    are inside it, the core's ±5 mm extrusion is not; every vertebra says how much of its core is missing."""
    st, vol, files = series(2, 5.0, 4.25)
    plane_x = float(np.array(list(st.params["spine_centers_lps"].values()), float).mean(0)[0])
    x0, dx = float(vol.affine[0, 3]), float(vol.affine[0, 0])
    assert dx > 0 and np.allclose(vol.affine[:3, :3], np.diag(np.diag(vol.affine[:3, :3])))
    keep = int(np.floor((plane_x + 3.0 - x0) / dx)) + 1  # columns whose centre lies at most 3 mm past the plane
    x_last = x0 + (keep - 1) * dx
    assert plane_x + 1.0 < x_last <= plane_x + 3.0
    out = tmp_path / "short_fov"
    out.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        arr = np.ascontiguousarray(ds.pixel_array[:, :keep])
        ds.Columns = keep
        ds.PixelData = arr.tobytes()
        ds.save_as(out / f.name)
    cut = load_volume(str(out))
    assert cut.data.shape == vol.data.shape[:2] + (keep,)
    res, truth, sag, _ = _measure(st, cut)
    assert not res.rejected and [v.level for v in res.vertebrae] == [t["level"] for t in truth]
    # expected from the geometry alone: lateral offsets -5..5 mm (1 mm steps); past x_last + half a pixel is outside
    offsets = np.arange(-5, 6, dtype=float)
    assert _lateral_samples(sag, 5.0) == offsets.size
    n_out = int(np.sum(plane_x + offsets > x_last + 0.5 * dx + 2e-3))
    assert 0 < n_out < offsets.size
    for v in res.vertebrae:
        assert v.trabecular_hu is not None or v.level not in LUMBAR  # the sagittal value is unaffected
        if v.trabecular_hu is None:  # T11, partly in view: its eroded ROI is too small for any value
            assert v.core_3d_reason == "no_roi" and v.core_3d_detail == "the sagittal ROI is too small (roi_too_small)"
            continue
        assert v.trabecular_hu_3d is None and "no_3d_core" in v.qc_flags and v.core_3d_reason == "outside_volume"
        n = v.roi_pixels // 3 * offsets.size
        assert v.core_3d_detail == (
            f"{100 * n_out / offsets.size:.1f} % of the core's {n} samples lie outside the scanned field of view, up "
            f"to {plane_x + 5.0 - x_last:.1f} mm beyond its outermost voxel centre (half a voxel is tolerated: 2.5 mm "
            "along the slices, 1 mm in-plane)"), v.core_3d_detail


@pytest.mark.parametrize("thickness,spacing", [(5.0, 4.25), (5.0, 5.0), (3.0, 5.0)],
                         ids=["5mm_every_4.25mm_overlap", "5mm_contiguous", "3mm_every_5mm_gaps"])
def test_edge_slices_are_clamped_and_a_real_cut_is_rejected(series, thickness, spacing):
    """The scan range ends inside a core: samples within half a slice thickness of the last slice centre (the slab that
    slice images) take its value; one slice fewer and the core leaves the scanned range (``outside_volume``).

    Each end of every L1–L4 core is cut at the last slice centre inside it (0.4–1.5 mm from the core's edge), a worst
    case: the samples clamped are those nearest the endplate, and the dropped neighbour slice is denser. Measured
    (seeds 1–4, 32 cuts each; clamped minus uncut value, mean / max |.|; MAE against the truth, clamped vs uncut):
    5 mm every 4.25 mm −0.7 / 2.0 HU, MAE 2.6 vs 2.6; 5 mm every 5 mm −1.0 / 4.6 HU, 2.6 vs 2.2; 3 mm every 5 mm
    −1.4 / 6.4 HU, 2.8 vs 2.5. A small shift against the core's own error, hence the bounds 2 / 8 HU and MAE + 0.5 HU.
    """
    cfg = get_bmd_cfg(QUICK)
    m = cfg.MEASURE
    diff, err_cut, err_full = [], [], []
    tolerance = thickness / 2 + 1e-3 * spacing  # half the slice thickness (+ the code's 1e-3 index units)
    for seed in SEEDS:
        st, vol, _ = series(seed, thickness, spacing)
        sag = truth_sagittal(st, vol, cfg)
        dets, truth = _gt_detections(st, sag)
        # the core ROI as the predictor erodes it: deeper than the sagittal ROI at 5 mm spacing
        rows_mm = max(m.EROSION_MM + m.EROSION_SLICE_FRACTION * slice_thickness_mm(vol),
                      m.CORE_MIN_EROSION_SLICES * spacing)
        z0, dz = float(vol.affine[2, 3]), float(vol.affine[2, 2])
        for mask, t in zip(dets["masks"], truth):
            if t["level"] not in LUMBAR:
                continue
            roi = erode_roi_ellipse(mask, m.EROSION_MM / sag.spacing, rows_mm / sag.spacing)
            full = measure_core_3d(vol, sag.transform, roi, m.CORE_HALF_WIDTH_MM)
            assert full.hu is not None and full.detail == ""
            k = (core_points_lps(sag.transform, roi, m.CORE_HALF_WIDTH_MM)[:, 2] - z0) / dz
            top, bottom = int(np.floor(k.max())), int(np.ceil(k.min()))
            for side, past in (("top", (k.max() - top) * dz), ("bottom", (bottom - k.min()) * dz)):
                for extra in (0, 1):  # the cut at the core's edge, then one slice further in
                    lo, hi = (0, top + 1 - extra) if side == "top" else (bottom + extra, vol.data.shape[0])
                    aff = vol.affine.copy()
                    aff[2, 3] = z0 + lo * dz
                    core = measure_core_3d(Volume(vol.data[lo:hi], aff, meta=vol.meta), sag.transform, roi,
                                           m.CORE_HALF_WIDTH_MM)
                    beyond = past + extra * dz
                    where = (seed, t["level"], side, beyond)
                    if beyond <= tolerance:
                        assert core.hu is not None and core.reason is None, where
                        assert re.fullmatch(r"\d+ of \d+ samples, up to [\d.]+ mm beyond the outermost voxel centre of "
                                            r"the slice range, take the edge voxel's value", core.detail), core.detail
                        diff.append(core.hu - full.hu)
                        err_cut.append(core.hu - t["trabecular_hu"])
                        err_full.append(full.hu - t["trabecular_hu"])
                    else:
                        assert core.hu is None and core.reason == "outside_volume", where
                        assert "outside the scanned slice range, up to " in core.detail, core.detail
                    assert float(re.search(r"up to ([\d.]+) mm", core.detail).group(1)) == \
                        pytest.approx(beyond, abs=0.051)
    d = np.array(diff)
    assert d.size >= len(SEEDS) * len(LUMBAR)  # at least one clamped end per vertebra
    assert abs(d.mean()) < 2.0 and np.abs(d).max() < 8.0, d
    assert np.abs(err_cut).mean() <= np.abs(err_full).mean() + 0.5
