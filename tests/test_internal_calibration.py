"""Internal (phantomless) calibration: ROI finder, spectrum fit, fallbacks, MEASURE.CALIBRATION selection.

Synthetic volumes are painted with the physics HU of the reference tissues (``physics_hu``: the fit's own model) at a
known spectrum and scanner offset/gain, so the fit must give back the rod line of that spectrum; a generator-v5
phantom checks the ROIs against its tissue truth and the line against its ``qct_calibration``.
"""
import math

import numpy as np
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import Volume
from bmd_d2.data.sagittal import SagittalPlane, make_sagittal, sample_volume_to_sagittal
from bmd_d2.data.datasets import params_from_cfg
from bmd_d2.errors import BMDError
from bmd_d2.levels import level_class
from bmd_d2.measure.classical import Calibration, calibration_method, study_calibration
from bmd_d2.measure.internal_calibration import (MIN_VOXELS, TISSUES, internal_calibration, nominal_line,
                                                 physics_hu, water_equivalent_diameter)
from bmd_d2.measure.vertebrae import measure_detections
from bmd_d2.phantoms import PhantomOptions, generate_study

PX, N, DZ = 2.0, 192, 3.0  # synthetic grid: 2 mm pixels, 192² (384 mm field of view), 3 mm slices
SPINE_XY = (0.0, 30.0)     # LPS mm: vertebral body centre (y > 0 posterior)


def _affine():
    a = np.diag([PX, PX, DZ, 1.0])
    a[:3, 3] = [-(N - 1) / 2 * PX, -(N - 1) / 2 * PX, 0.0]
    return a


def _painted(hu, kvp, al_mm, offset, gain, *, contrast=False, no_fat=False, metal_slices=(), slices=6, seed=0):
    """A synthetic abdomen: air, a body of subcutaneous fat / muscle wall / fatty cavity, a vertebra, two erector
    spinae muscles, an aorta in fat, a liver; tissue HU = offset + gain * physics HU through the spectrum hardened by
    the painted body's own water-equivalent diameter (found by repainting once). Noise SD 10 HU (seeded)."""
    c = (np.arange(N) - (N - 1) / 2) * PX
    X, Y = np.meshgrid(c, c)
    sx, sy = SPINE_XY

    def ell(cx, cy, a, b):
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0

    outer, wall, cavity = ell(0, 0, 140, 125), ell(0, 0, 120, 105), ell(0, 0, 110, 95)
    vert, trab = ell(sx, sy, 20, 17), ell(sx, sy, 17, 14)
    erector = ell(sx - 28, sy + 50, 18, 20) | ell(sx + 28, sy + 50, 18, 20)
    aorta = ell(sx + 15, sy - 17 - 4 - 11, 11, 11)
    liver = ell(-70, -30, 35, 30)
    rng = np.random.default_rng(seed)
    water = 250.0
    for _ in range(2):
        ph = {k: offset + gain * v for k, v in physics_hu(kvp, al_mm, water).items() if k in TISSUES}
        img = np.full((N, N), ph["air"], np.float64)
        fat = ph["muscle"] if no_fat else ph["fat"]
        img[outer] = fat
        img[wall] = ph["muscle"]
        img[cavity] = fat
        img[liver] = offset + gain * 55.0
        img[erector] = ph["muscle"]
        img[aorta] = 300.0 if contrast else ph["blood"]
        img[vert] = 700.0
        img[trab] = hu
        water = water_equivalent_diameter(img, outer, PX)
    vol = np.stack([img + rng.normal(0.0, 10.0, img.shape) for _ in range(slices)]).astype(np.float32)
    for k in metal_slices:
        vol[k, 100, 96] = 3000.0
    spine = np.array([[sx, sy, k * DZ] for k in range(slices)])
    return vol, spine, water


def _rod_line(kvp, al_mm, water, offset, gain):
    ph = physics_hu(kvp, al_mm, water)
    return gain * ph["rod_slope"], offset + gain * ph["rod_zero"]


@pytest.mark.parametrize("kvp,al_mm,offset,gain", [(100.0, 5.0, 3.0, 1.0), (120.0, 9.5, -3.0, 1.01),
                                                    (140.0, 7.0, 0.0, 0.99)])
def test_fit_recovers_the_painted_spectrum(kvp, al_mm, offset, gain):
    vol, spine, water = _painted(150.0, kvp, al_mm, offset, gain)
    res = internal_calibration(vol, _affine(), kvp=kvp, spine_lps=spine)
    assert res.ok, res.reason
    slope, intercept = _rod_line(kvp, al_mm, water, offset, gain)
    assert res.fit.kvp == kvp and res.fit.kvp_source == "tag"
    assert res.fit.wed_mm == pytest.approx(water, rel=0.03)  # the TG 220 diameter measured on the image
    assert res.slope == pytest.approx(slope, rel=0.02) and res.intercept == pytest.approx(intercept, abs=2.0)
    # the uncertainty covers the error and is not absurdly wide
    assert abs(res.slope - slope) < 3 * res.slope_sd < 0.15 * slope
    for t in TISSUES:
        roi = res.roi(t)
        assert roi.used and roi.voxels >= 100 and abs(roi.residual_hu) < 4.0, roi
    assert not res.flags and res.seconds < 5.0
    # the fitted effective energy follows the painted filtration
    assert res.fit.effective_energy_kev == pytest.approx(
        physics_hu(kvp, al_mm, water)["effective_energy_kev"], abs=3.0)


def test_unknown_kvp_is_fitted_with_a_wider_uncertainty():
    vol, spine, water = _painted(150.0, 100.0, 7.0, 0.0, 1.0)
    known = internal_calibration(vol, _affine(), kvp=100.0, spine_lps=spine)
    res = internal_calibration(vol, _affine(), kvp=None, spine_lps=spine)
    assert res.ok and res.fit.kvp_source == "fitted" and set(res.fit.kvp_weights) >= {"80", "100", "140"}
    assert sum(res.fit.kvp_weights.values()) == pytest.approx(1.0)
    assert res.slope_sd > known.slope_sd
    slope, _ = _rod_line(100.0, 7.0, water, 0.0, 1.0)
    assert abs(res.slope - slope) < 3 * res.slope_sd


def test_contrast_aorta_leaves_blood_out():
    vol, spine, water = _painted(150.0, 120.0, 7.0, 0.0, 1.0, contrast=True)
    res = internal_calibration(vol, _affine(), kvp=120.0, spine_lps=spine)
    assert "calibration_contrast" in res.flags and res.info["contrast"]["enhanced"]
    assert not res.roi("blood").used and "contrast" in res.roi("blood").reason
    assert res.ok and res.roi("fat").used and res.roi("muscle").used  # still calibrated from the other tissues
    slope, _ = _rod_line(120.0, 7.0, water, 0.0, 1.0)
    assert res.slope == pytest.approx(slope, rel=0.04)


def test_no_fat_in_view_falls_back():
    vol, spine, _ = _painted(150.0, 120.0, 7.0, 0.0, 1.0, no_fat=True)
    res = internal_calibration(vol, _affine(), kvp=120.0, spine_lps=spine)
    assert not res.ok and "fat" in res.reason and not res.roi("fat").used


def test_a_failed_fit_falls_back_to_the_nominal_line_of_the_kvp():
    vol, spine, water = _painted(150.0, 80.0, 7.5, 0.0, 1.0, no_fat=True)
    volume = Volume(vol, _affine(), meta={"source": "test", "KVP": 80.0})
    cal = study_calibration(get_bmd_cfg(), volume, spine)
    assert cal.method == "nominal" and {"calibration_fallback", "uncalibrated"} <= set(cal.flags)
    assert "fat" in cal.details["fallback_reason"] and cal.details["nominal"]["kvp_source"] == "tag"
    # the priors' own line: 80 kVp, 7.5 mm Al, hardened by the patient's WED (found although the fit failed)
    wed = cal.details["internal"]["info"]["wed_mm"]
    assert wed == pytest.approx(water, rel=0.05)
    slope, intercept = _rod_line(80.0, 7.5, wed, 0.0, 1.0)
    assert cal.slope == pytest.approx(slope, rel=1e-6) and cal.intercept == pytest.approx(intercept, abs=1e-6)
    assert 1.4 < cal.slope < 1.8 and 0.02 * cal.slope < cal.slope_sd < 0.2 * cal.slope  # far from the generic 1.0
    # no KVP tag: the clinical kVp mix, lower (mostly 120 kVp) and looser than the 80 kVp line
    line, cov, info = nominal_line(None, wed)
    tagged, tagged_cov, _ = nominal_line(120.0, wed)
    assert info["kvp_source"] == "prior" and line[0] < cal.slope and cov[0, 0] > tagged_cov[0, 0]
    assert line[0] == pytest.approx(tagged[0], rel=0.1)
    assert nominal_line(140.0, wed)[0][0] < tagged[0] < nominal_line(100.0, wed)[0][0]
    with pytest.raises(ValueError, match="kVp 70"):
        nominal_line(70.0, wed)


def test_coarse_pixels_count_tissue_by_area():
    # a 4 mm-pixel reconstruction of the same abdomen: few voxels of muscle, but as much area as a fine one
    vol, spine, water = _painted(150.0, 120.0, 7.0, 0.0, 1.0, slices=2)
    coarse = vol[:, 1::2, 1::2].reshape(vol.shape[0], N // 2, N // 2)
    a = _affine()
    a[:2, :2] *= 2.0
    a[:2, 3] += PX / 2.0
    res = internal_calibration(coarse, a, kvp=120.0, spine_lps=spine)
    muscle = res.roi("muscle")
    assert muscle.voxels < MIN_VOXELS["muscle"] and muscle.used, (muscle.voxels, muscle.reason)
    assert res.ok and res.slope == pytest.approx(_rod_line(120.0, 7.0, water, 0.0, 1.0)[0], rel=0.04)


def test_metal_slices_are_skipped_and_metal_everywhere_falls_back():
    vol, spine, _ = _painted(150.0, 120.0, 7.0, 0.0, 1.0, metal_slices=(0, 1))
    some = internal_calibration(vol, _affine(), kvp=120.0, spine_lps=spine[:3])
    assert some.ok and "calibration_metal" not in some.flags  # a clean neighbour within 10 mm replaces them
    assert not {0, 1} & set(some.info["slices"])
    vol, spine, _ = _painted(150.0, 120.0, 7.0, 0.0, 1.0, metal_slices=range(6))
    res = internal_calibration(vol, _affine(), kvp=120.0, spine_lps=spine)
    assert not res.ok and "metal" in res.reason and "calibration_metal" in res.flags


def test_out_of_range_kvp_and_no_spine_fall_back():
    vol, spine, _ = _painted(150.0, 120.0, 7.0, 0.0, 1.0)
    res = internal_calibration(vol, _affine(), kvp=70.0, spine_lps=spine)
    assert not res.ok and "kVp 70" in res.reason
    res = internal_calibration(np.full((4, 64, 64), -1000.0, np.float32), _affine(), kvp=120.0)
    assert not res.ok and res.slope is None  # nothing to measure at: no spine found


# ------------------------------------------------------------------------------------------- generator-v5 phantom
@pytest.fixture(scope="module")
def phantom():
    opts = PhantomOptions.tiny(matrix=192, pixel_spacing=2.0, slice_thickness=5.0, slice_spacing=5.0, metal=False,
                               fracture=False, scoliosis=False, contrast=False, generator_version=5)
    st = generate_study(7, opts)
    vol = Volume(st.quantized_hu(), st.affine, meta={"source": "phantom", "KVP": st.params["kvp"]})
    return st, vol


def _gt(st, vol, cfg):
    centres = np.array(list(st.params["spine_centers_lps"].values()), float)
    plane = SagittalPlane(point=centres.mean(0), normal=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
                          row_dir=np.array([0, 0, -1.0]))
    sag = make_sagittal(vol, plane=plane, **params_from_cfg(cfg))
    lab = sample_volume_to_sagittal(sag, Volume(st.labels.astype(np.float32), st.affine), order=0)[1]
    masks, classes, boxes = [], [], []
    for t in st.truth:
        m = lab == t["label"]
        if m.sum() >= 50:
            r, c = np.nonzero(m)
            masks.append(m)
            classes.append(level_class(t["level"]))
            boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    dets = dict(boxes=np.array(boxes, float), scores=np.ones(len(masks)), classes=np.array(classes),
                masks=np.array(masks), bmd=np.full(len(masks), 100.0))
    return dets, sag


def test_rois_and_line_on_a_physics_phantom(phantom):
    st, vol = phantom
    p = st.params
    spine = np.array([p["spine_centers_lps"][t["level"]] for t in st.truth if t["level"] != "S1"])
    res = internal_calibration(vol.data, vol.affine, kvp=p["kvp"], spine_lps=spine)
    assert res.ok, res.reason
    truth = p["tissue_hu"]
    # the ROIs lie in the right tissue: their median reads the tissue's imaged HU (muscle: partial volume with the
    # fat around the erector spinae, and v5 paints the erector spinae 5 HU above muscle_hu)
    assert res.roi("air").median_hu == pytest.approx(truth["air"], abs=3.0)
    assert res.roi("fat").median_hu == pytest.approx(truth["fat"], abs=4.0)
    assert res.roi("muscle").median_hu == pytest.approx(truth["muscle"], abs=12.0)
    if res.roi("blood").used:
        assert res.roi("blood").median_hu == pytest.approx(truth["blood"], abs=8.0)
    q = p["qct_calibration"]
    assert abs(res.slope - q["slope"]) < max(3 * res.slope_sd, 0.02 * q["slope"])
    assert abs(res.intercept - q["intercept"]) < max(3 * res.intercept_sd, 3.0)
    assert res.slope_sd < 0.1 * res.slope


def _measure(cfg, st, vol, **kw):
    dets, sag = _gt(st, vol, cfg)
    return measure_detections(dets, sag, cfg, volume=vol, study_id="ph", **kw)


def test_auto_none_file_selection_and_flags(phantom, tmp_path):
    st, vol = phantom
    # auto without a file: the study's internal calibration, with a +- value per vertebra
    cfg = get_bmd_cfg()
    assert calibration_method(cfg) == "internal"
    res = _measure(cfg, st, vol)
    assert res.calibration["method"] == "internal" and res.calibration["source"] == "internal"
    det = res.calibration["details"]
    assert {r["name"] for r in det["rois"]} == set(TISSUES) and det["fit"]["kvp_source"] == "tag"
    assert res.calibration["slope_sd"] > 0 and "uncalibrated" not in res.qc_flags
    for v in res.vertebrae:
        assert v.classical_bmd is not None and v.classical_bmd_sd > 0 and "uncalibrated" not in v.qc_flags
        assert v.classical_bmd == pytest.approx((v.trabecular_hu - res.calibration["intercept"])
                                                / res.calibration["slope"])
    d = res.to_dict()
    assert d["calibration"]["details"]["fit"]["water_mm"] > 0 and "classical_bmd_sd" in d["vertebrae"][0]
    # none: the generic line, every vertebra flagged
    res = _measure(get_bmd_cfg(opts=["MEASURE.CALIBRATION", "none"]), st, vol)
    assert res.calibration["method"] == "default" and "uncalibrated" in res.qc_flags
    assert all("uncalibrated" in v.qc_flags and v.classical_bmd == pytest.approx(v.trabecular_hu)
               for v in res.vertebrae)
    # file (and auto with a file): the phantom file
    f = tmp_path / "cal.json"
    f.write_text('{"slope": 1.2, "intercept": 5.0}')
    for mode in ("file", "auto"):
        cfg = get_bmd_cfg(opts=["MEASURE.CALIBRATION", mode, "MEASURE.CALIBRATION_FILE", str(f)])
        assert calibration_method(cfg) == "file"
        res = _measure(cfg, st, vol)
        assert res.calibration["method"] == "file" and res.calibration["slope"] == 1.2
        assert not any(fl.startswith("calibration_") or fl == "uncalibrated" for fl in res.qc_flags)
    # an explicit calibration is used as given
    res = _measure(get_bmd_cfg(), st, vol, calibration=Calibration(2.0, 0.0, "test", method="file"))
    assert res.calibration["slope"] == 2.0


def test_unknown_calibration_never_gives_a_number_without_its_flag(phantom):
    st, vol = phantom
    cfg = get_bmd_cfg()
    cal = study_calibration(cfg, None, None)
    assert cal.method == "default" and {"calibration_fallback", "uncalibrated"} <= set(cal.flags)
    assert "no source volume" in cal.details["fallback_reason"]
    # the internal calibration fails: a KVP tag outside the physics model's 80-140 kV
    crop = Volume(vol.data, vol.affine, meta=dict(vol.meta, KVP=70.0))
    for c in (cfg, get_bmd_cfg(opts=["MEASURE.CALIBRATION", "none"])):
        res = _measure(c, st, crop)
        assert res.vertebrae
        for v in res.vertebrae:
            if res.calibration["method"] == "default":
                assert "uncalibrated" in v.qc_flags
            if v.classical_bmd is not None:
                assert res.calibration["method"] in ("internal", "file") or "uncalibrated" in v.qc_flags
    res = _measure(cfg, st, crop)
    assert res.calibration["method"] == "default" and res.calibration["details"]["fallback_reason"]
    assert "calibration_fallback" in res.qc_flags and all("calibration_fallback" in v.qc_flags
                                                            for v in res.vertebrae)


def test_config_validation_messages(tmp_path):
    with pytest.raises(BMDError, match=r"MEASURE.CALIBRATION must be 'auto' or 'file' or 'none', not 'phantom'"):
        get_bmd_cfg(opts=["MEASURE.CALIBRATION", "phantom"])
    with pytest.raises(BMDError, match=r"MEASURE.CALIBRATION 'file' needs MEASURE.CALIBRATION_FILE"):
        get_bmd_cfg(opts=["MEASURE.CALIBRATION", "file"])
    f = tmp_path / "cal.json"
    f.write_text('{"slope": 1.2, "intercept": 5.0}')
    with pytest.raises(BMDError, match=r"'none' uses the linear default: remove MEASURE.CALIBRATION_FILE"):
        get_bmd_cfg(opts=["MEASURE.CALIBRATION", "none", "MEASURE.CALIBRATION_FILE", str(f)])
    assert get_bmd_cfg().MEASURE.CALIBRATION == "auto"


def test_bmd_sd_propagates_the_line_covariance():
    cal = Calibration(1.2, 5.0, "internal", method="internal", covariance=[[0.03 ** 2, 0.0], [0.0, 2.0 ** 2]])
    hu = 125.0
    bmd = (hu - 5.0) / 1.2
    assert cal.bmd_sd(hu) == pytest.approx(math.hypot(bmd * 0.03 / 1.2, 2.0 / 1.2))
    assert Calibration().bmd_sd(hu) is None and cal.bmd_sd(None) is None
