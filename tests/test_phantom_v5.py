"""Phantom generator v5 (X-ray physics): v4 still reproducible, tissues that move with the spectrum, the truth of a
phantom QCT and its marrow-fat bias, iodine, and the DICOM tags.

Measured values come from the rendered volumes (noise and PSF off, so a region's HU is exact up to partial volume)
and are compared with the study's truth (``tissue_hu``, ``qct_calibration``, the per-level truth) and with the
physics tables (:mod:`bmd_d2.phantoms.physics`).
"""
import hashlib
import json

import numpy as np
import pydicom
import pytest

import bmd_d2.phantoms as ph
from bmd_d2.levels import LEVELS
from bmd_d2.phantoms import anatomy as ph_anatomy
from bmd_d2.phantoms import physics as P
from bmd_d2.phantoms import tissues

# sha256 of hu / labels / cores (and of the params + truth JSON for seed 1) of PhantomOptions.tiny() studies, recorded
# with generator v4 before v5 existed (git f946570, numpy/scipy of this environment's lock file)
V4_TINY = {
    1: ("5fc80b2a6e8298d360ecf3dcb4a0dcc37d3e1f449f6ff3a8a4a6fe1fbfdaecbe",
        "c2e45ae682f193f3badf08617a81fcc0d340d96e43f08dbed78229e300d75c32",
        "c06e0d5ca55cce3f6630422edd969757e331558bdac1e9feec0cd3e2bd4b3102"),
    2: ("af53434d7cebab602b0c8a0a8a7cf4eac3b3e10d7f8441111c52643f6da6b05e",
        "51645f6d7962c502e97f7d2ea4bc23cbaaa046f07f2c5d3fc2ee923a1044eab7",
        "755bb07133dc9a13bc6bb89cf6ca6269335c20657d69eddf679ce145a7d89e9f"),
    3: ("0947ba943147b53991c920bde29d04f256e8ef12a72c7f6b58716e0ce2eb3d50",
        "65ee7628ca4424be34bf34def4a2c67877fd892fa296caab8ca71dd4cc833c8a",
        "7c95a8a762b5a8c84541e80f5c2bc5d3055e58ff7520dcb910d33036ab26ddd8"),
}
V4_TINY1_JSON = "e358d4ddddd097dad6fe856aea9d0bc3d0a1cf665f15b0650cff35a85db6e005"
CLEAN = dict(noise_sd=0.0, psf_sigma_mm=0.0, fracture=False, metal=False)


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _tiny(seed, **kw):
    return ph.generate_study(seed, ph.PhantomOptions.tiny(**{**CLEAN, **kw}))


def _core_means(st):
    return {t["level"]: float(st.hu[st.cores == t["label"]].mean(dtype=np.float64)) for t in st.truth}


def test_v4_reproduces_the_previous_generator_bit_for_bit():
    for seed, (hu, labels, cores) in V4_TINY.items():
        st = ph.generate_study(seed, ph.PhantomOptions.tiny(generator_version=4))
        assert (_sha(st.hu), _sha(st.labels), _sha(st.cores)) == (hu, labels, cores), seed
        assert st.generator_version == 4 and "qct_calibration" not in st.params
        if seed == 1:
            js = json.dumps(dict(params=st.params, truth=st.truth), sort_keys=True, default=str)
            assert hashlib.sha256(js.encode()).hexdigest() == V4_TINY1_JSON


def test_v5_draws_come_after_v4_so_the_anatomy_is_kept(tmp_path):
    v4 = ph.generate_study(2, ph.PhantomOptions.tiny(generator_version=4))
    v5 = ph.generate_study(2, ph.PhantomOptions.tiny())
    assert v5.generator_version == ph.GENERATOR_VERSION == 5
    assert np.array_equal(v4.labels, v5.labels) and np.array_equal(v4.cores, v5.cores)
    assert [t["bmd_mg_cm3"] for t in v4.truth] == [t["bmd_mg_cm3"] for t in v5.truth]
    for k in ("bmd_mg_cm3", "size", "body_half_width", "noise_sd", "contrast", "fracture", "posterior_core_factor"):
        assert v4.params[k] == v5.params[k], k
    assert not np.array_equal(v4.hu, v5.hu)
    ph.write_study(v5, tmp_path / "s", preview=False)
    rec = json.loads((tmp_path / "s" / "phantom.json").read_text())
    assert rec["generator_version"] == 5 and rec["params"]["qct_calibration"] == v5.params["qct_calibration"]


def _fat_mode(st):
    """The most frequent HU between -200 and -50 (the flat subcutaneous fat) on a 0.25 HU grid."""
    v = st.hu[(st.hu > -200) & (st.hu < -50)]
    vals, counts = np.unique(np.round(v * 4.0) / 4.0, return_counts=True)
    return float(vals[np.argmax(counts)])


def test_tissues_and_mineral_slope_move_with_kvp():
    """Same patient and scanner at 80 and 140 kVp: fat darkens and bone brightens per mg at low kVp, in the volume as
    in the truth; the mineral slope measured between two BMDs is the truth's and the rods' slope falls with kVp."""
    seed = 5
    studies = {(kvp, bmd): _tiny(seed, kvp=kvp, bmd_mg_cm3=bmd, matrix=192)  # 384 mm: the whole body in view
               for kvp in (80.0, 140.0) for bmd in (60.0, 160.0)}
    fat = {}
    slopes = {}
    for kvp in (80.0, 140.0):
        lo, hi = studies[kvp, 60.0], studies[kvp, 160.0]
        fat[kvp] = _fat_mode(lo)
        assert fat[kvp] == pytest.approx(lo.params["tissue_hu"]["fat"], abs=0.5)
        m_lo, m_hi = _core_means(lo), _core_means(hi)
        per_level = []
        for t_lo, t_hi in zip(lo.truth, hi.truth):
            d_bmd = t_hi["bmd_mg_cm3"] - t_lo["bmd_mg_cm3"]
            measured = (m_hi[t_lo["level"]] - m_lo[t_lo["level"]]) / d_bmd
            expected = (t_hi["calibrated_hu"] - t_lo["calibrated_hu"]) / d_bmd
            assert measured == pytest.approx(expected, rel=0.01), (kvp, t_lo["level"])
            per_level.append(measured)
        slopes[kvp] = float(np.mean(per_level))
        assert slopes[kvp] == pytest.approx(lo.params["hu_per_mg"], rel=0.01)
        # the same scanner: only the hardening by the denser vertebra (in water_mm) moves the rods, by < 0.1 %
        assert lo.params["water_mm"] < hi.params["water_mm"] < lo.params["water_mm"] + 2.0
        assert hi.params["qct_calibration"]["slope"] == pytest.approx(lo.params["qct_calibration"]["slope"], rel=1e-3)
    assert fat[80.0] < fat[140.0] - 10.0
    assert slopes[80.0] > 1.3 * slopes[140.0]
    q80, q140 = (studies[k, 60.0].params["qct_calibration"]["slope"] for k in (80.0, 140.0))
    assert q80 > 1.3 * q140 and 0.95 < q140 < q80 < 1.9
    e80, e140 = (studies[k, 60.0].params["effective_energy_kev"] for k in (80.0, 140.0))
    assert 45.0 < e80 < e140 < 95.0
    t80, t140 = (studies[k, 60.0].params["tissue_hu"] for k in (80.0, 140.0))
    assert t80["cortical"] > t140["cortical"] + 100.0 and abs(t80["air"] - t140["air"]) < 1e-6


def test_truth_is_a_phantom_qct_with_the_marrow_fat_bias():
    """qct_bmd = (the trabecular bone's HU - rod intercept) / rod slope; more marrow fat reads less mineral; a phantom
    calibration file made from calib_a / calib_b turns that HU into qct_bmd (the cortex's partial volume in the
    core's rim, trabecular_hu - calibrated_hu, is not part of it)."""
    from bmd_d2.measure.classical import Calibration

    lean, fatty = (_tiny(9, marrow_fat_fraction=f) for f in (0.2, 0.7))
    for st in (lean, fatty):
        p = st.params
        q = p["qct_calibration"]
        assert (p["calib_a"], p["calib_b"]) == (q["intercept"], q["slope"])
        resid = np.asarray(q["rods_hu"]) - (q["intercept"] + q["slope"] * np.asarray(q["rods_mg_cm3"]))
        assert np.abs(resid).max() < 1e-6  # K2HPO4 in water is linear in this model
        assert abs(q["intercept"] - p["hu_offset"]) < 1e-6  # the water rod reads the scanner's offset
        assert {"air", "fat", "muscle", "blood", "liver", "kidney", "cortical"} <= set(p["tissue_hu"])
        assert p["tissue_hu"]["air"] == pytest.approx(-1000.0 * p["hu_gain"] + p["hu_offset"])
        assert 150.0 < p["water_mm"] < 420.0 and p["kvp"] in (80.0, 100.0, 110.0, 120.0, 130.0, 140.0)
        spectrum = P.tube_spectrum(p["kvp"], anode_angle_deg=p["anode_angle_deg"], al_mm=p["al_mm"],
                                   cu_mm=p["cu_mm"], water_mm=p["water_mm"])
        assert p["effective_energy_kev"] == pytest.approx(P.effective_energy(spectrum), abs=1e-6)
        cal = Calibration(p["calib_b"], p["calib_a"], "phantom")
        measured = _core_means(st)
        for t in st.truth:
            i = LEVELS.index(t["level"])
            assert t["fat_fraction"] == pytest.approx(p["marrow_fat_fraction_levels"][i], abs=1e-4)
            assert abs(t["trabecular_hu"] - t["calibrated_hu"]) < 2.0  # the core mean is the physics HU of the BMD
            assert abs(measured[t["level"]] - t["trabecular_hu"]) < 0.01
            assert cal.hu_to_bmd(t["calibrated_hu"]) == pytest.approx(t["qct_bmd_mg_cm3"], abs=2e-3)
            assert t["fat_bias_mg_cm3"] == pytest.approx(t["qct_bmd_mg_cm3"] - t["bmd_mg_cm3"], abs=2e-3)
    assert [t["bmd_mg_cm3"] for t in lean.truth] == [t["bmd_mg_cm3"] for t in fatty.truth]
    for t_lean, t_fat in zip(lean.truth, fatty.truth):
        assert t_fat["qct_bmd_mg_cm3"] < t_lean["qct_bmd_mg_cm3"] - 15.0, t_lean["level"]
        assert t_fat["fat_bias_mg_cm3"] < -10.0  # fatty marrow: QCT reads well below the mineral


def _aorta_centre_hu(st):
    """HU at the aorta's centre on the L3 slice (the renderer's geometry: 14 mm left of and in front of the body)."""
    p = st.params
    c = np.asarray(p["spine_centers_lps"]["L3"])
    half_depth = p["levels"]["L3"]["depth_mm"] / 2.0
    x, y = c[0] + 14.0, c[1] - half_depth - p["aorta_radius"] - 3.0
    i, j, k = (np.linalg.inv(st.affine) @ np.array([x, y, c[2], 1.0]))[:3]
    return float(st.hu[int(round(k)), int(round(j)), int(round(i))])


def test_iodine_raises_aorta_hu_as_tabulated():
    plain = _tiny(12, contrast_phase="none", matrix=128, pixel_spacing=1.5)
    art = _tiny(12, contrast_phase="arterial", matrix=128, pixel_spacing=1.5)
    pv = _tiny(12, contrast_phase="portal_venous", matrix=128, pixel_spacing=1.5)
    assert not plain.params["contrast"] and art.params["contrast"] and pv.params["contrast"]
    p = art.params
    mg = p["iodine_mg_ml"]["aorta"]
    assert 10.0 <= mg <= 20.0 and 4.0 <= pv.params["iodine_mg_ml"]["aorta"] <= 8.0
    spectrum = P.tube_spectrum(p["kvp"], anode_angle_deg=p["anode_angle_deg"], al_mm=p["al_mm"], cu_mm=p["cu_mm"],
                               water_mm=p["water_mm"])
    blood = P.Material("blood_hct", 1.025 + 0.075 * p["hematocrit"], P.MATERIALS["blood"].composition)
    rise = P.hu(P.with_iodine(blood, mg), spectrum) - P.hu(blood, spectrum)  # the tables, per this scanner
    a0, a1 = _aorta_centre_hu(plain), _aorta_centre_hu(art)
    assert a0 == pytest.approx(plain.params["tissue_hu"]["aorta"], abs=1.0)
    assert a1 == pytest.approx(p["tissue_hu"]["aorta"], abs=1.0)
    assert a1 - a0 == pytest.approx(p["hu_gain"] * rise, rel=0.01)
    assert 18.0 * mg < a1 - a0 < 55.0 * mg  # about 22 (140 kVp) to 45 (80 kVp) HU per mg I/ml
    for organ in ("liver", "kidney"):
        assert plain.params["tissue_hu"][organ] < art.params["tissue_hu"][organ]
        assert plain.params["tissue_hu"][organ] < pv.params["tissue_hu"][organ]
    # the bone is not enhanced: the cores read the same HU in every phase, up to the iodine's extra beam hardening
    assert plain.params["water_mm"] < art.params["water_mm"] < plain.params["water_mm"] + 3.0
    assert [t["trabecular_hu"] for t in plain.truth] == pytest.approx([t["trabecular_hu"] for t in art.truth],
                                                                      abs=0.05)


def test_dicom_writes_kvp_on_most_studies_and_the_patient_age_and_sex(tmp_path):
    draws = {s: ph_anatomy.draw_params(np.random.default_rng(s), ph.PhantomOptions(kvp=120.0)) for s in range(40)}
    written = [s for s, d in draws.items() if d["kvp_tag_written"]]
    assert 0.7 < len(written) / len(draws) < 1.0 and all(20 <= d["age"] <= 90 for d in draws.values())
    missing = next(s for s in draws if not draws[s]["kvp_tag_written"])
    contrast = next(s for s in written if draws[s]["contrast"] and draws[s]["contrast_tag_written"])
    for seed in (written[0], missing, contrast):
        st = ph.generate_study(seed, ph.PhantomOptions.tiny(kvp=120.0, matrix=48))
        ph.write_dicom_series(st, tmp_path / str(seed))
        ds = pydicom.dcmread(next((tmp_path / str(seed)).glob("*.dcm")), stop_before_pixels=True)
        p = st.params
        assert ("KVP" in ds) == p["kvp_tag_written"]
        if p["kvp_tag_written"]:
            assert float(ds.KVP) == 120.0
        assert ds.PatientAge == f"{p['age']:03d}Y" and ds.PatientSex == p["patient_sex"] in ("M", "F")
        assert ("ContrastBolusAgent" in ds) == (p["contrast"] and p["contrast_tag_written"])
    assert "ContrastBolusAgent" in pydicom.dcmread(next((tmp_path / str(contrast)).glob("*.dcm")),
                                                   stop_before_pixels=True)


def test_water_equivalent_diameter_matches_the_rendered_l3_slice():
    """The analytic TG 220 diameter (the spectrum's hardening) against the one measured on the L3 slice."""
    for seed in (3, 4):
        st = ph.generate_study(seed, ph.PhantomOptions.tiny(matrix=256, pixel_spacing=2.0, table=False, noise_sd=0.0,
                                                            kvp=120.0))
        c = st.params["spine_centers_lps"]["L3"]
        k = int(round((np.linalg.inv(st.affine) @ np.array([*c, 1.0]))[2]))
        measured = tissues.measured_water_equivalent_diameter(st.hu[k], st.spacing[1] * st.spacing[2])
        assert measured == pytest.approx(st.params["water_mm"], rel=0.05), seed


def test_v5_options_are_validated():
    with pytest.raises(ValueError, match="need generator_version 5"):
        ph.PhantomOptions(kvp=120.0, generator_version=4).validate()
    with pytest.raises(ValueError, match="generator_version must be one of"):
        ph.PhantomOptions(generator_version=3).validate()
    with pytest.raises(ValueError, match="kvp must be within 80–140"):
        ph.PhantomOptions(kvp=150.0).validate()
    with pytest.raises(ValueError, match="contradicts"):
        ph.PhantomOptions(contrast=False, contrast_phase="arterial").validate()
    with pytest.raises(ValueError, match="contrast_phase must be one of"):
        ph.PhantomOptions(contrast_phase="venous").validate()
