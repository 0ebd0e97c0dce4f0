"""Level counting with two anchors (issue 18): the detector's sacrum and the last rib found in 3-D.

Every branch of the rule in :func:`bmd_d2.levels.assign_levels` — agree, conflict, one anchor each way, none, an
unusable rib anchor — on synthetic detections (including the transitional cases the phantom generator cannot make
yet: 11/13 rib pairs, 4/6 lumbar vertebrae), then through the measurement on a phantom with known truth (ground-truth
masks as detections, fields of view holding both anchors, only the ribs, only the sacrum) and on the real CT.
"""
import json
import os

import numpy as np
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import Volume, load_nifti
from bmd_d2.data.sagittal import sample_volume_to_sagittal
from bmd_d2.evaluation.benchmark_speed import _timed_anchor_steps
from bmd_d2.levels import LEVELS, Detection, RibLevel, SacrumLevel, assign_levels, level_class
from bmd_d2.measure.classical import Calibration
from bmd_d2.measure.predictor import measure_detections, sagittal_from_cfg
from bmd_d2.phantoms import PhantomOptions
from bmd_d2.phantoms.dataset import generate_study

PITCH = 35.0
BODIES = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]


def vert(cy, h=25.0):
    return Detection(0, 0.9, (82.0, cy - h / 2, 118.0, cy + h / 2), (100.0, cy))


def spine(n=7, y0=60.0, sacrum=True):
    """n bodies at pitch PITCH, the sacrum's top 0.6 pitch below the caudal-most one."""
    dets = [vert(y0 + PITCH * i) for i in range(n)]
    if sacrum:
        top = y0 + PITCH * (n - 1) + 0.6 * PITCH
        dets.append(Detection(1, 0.9, (85.0, top, 135.0, top + 60.0), (110.0, top + 30.0)))
    return dets


def rib_at(dets, k, n_pairs=2, confidence=1.0, dy=4.0):
    """The last rib's joints 4 px below the centre of body ``k`` (as the 3-D joints lie)."""
    return RibLevel(row=dets[k].centroid[1] + dy, n_pairs=n_pairs, confidence=confidence)


def levels_of(a):
    return [a.levels[i] for i in a.order]


def test_sacrum_and_rib_agree():
    dets = spine()
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 1))  # body 1 is T12 from the sacrum too
    assert levels_of(a) == BODIES + ["S1"]
    assert a.anchor == "sacrum+rib" and a.anchored and a.rib_pairs_in_view == 2
    assert a.labelings == {"sacrum": BODIES + ["S1"], "rib": BODIES + ["S1"]}
    assert not {"level_count_conflict", "levels_unanchored"} & set(a.study_flags)


@pytest.mark.parametrize("case, rib_body, n, rib_labels", [
    # 13 rib pairs: the body the sacrum calls L1 bears the last rib, so the rib count shifts every level up by one
    ("13 ribs", 2, 7, [None, "T11", "T12", "L1", "L2", "L3", "L4"]),
    # 11 rib pairs: the last rib on the sacrum's T11
    ("11 ribs", 0, 7, ["T12", "L1", "L2", "L3", "L4", "L5", None]),
    # sacralised L5 (4 lumbar bodies above the sacrum): the sacrum's T12 is the true T11
    ("4 lumbar", 2, 7, [None, "T11", "T12", "L1", "L2", "L3", "L4"]),
    # lumbarised S1 (6 lumbar-type bodies): counted from the rib, the lowest is below L5
    ("6 lumbar", 0, 7, ["T12", "L1", "L2", "L3", "L4", "L5", None]),
])
def test_transitional_anatomy_gives_a_conflict_with_both_labelings(case, rib_body, n, rib_labels):
    dets = spine(n)
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, rib_body, n_pairs=3))
    assert "level_count_conflict" in a.study_flags, case
    assert all("level_count_conflict" in a.flags[i] for i in a.order[:-1])
    assert a.anchor == "sacrum"  # the primary convention: counted from the sacrum
    assert levels_of(a) == BODIES + ["S1"]
    assert a.labelings["sacrum"] == BODIES + ["S1"] and a.labelings["rib"] == rib_labels + ["S1"]
    assert a.rib_pairs_in_view == 3


def test_rib_alone_names_the_levels_where_the_sacrum_is_out_of_view():
    dets = spine(5, sacrum=False)  # T12 … L4 in view, the field of view ends below L4
    fov = (0, int(dets[-1].box[3]) + 5)
    assert "levels_unknown" in assign_levels(dets, image_shape=(512, 512), fov_rows=fov).study_flags  # as today
    a = assign_levels(dets, image_shape=(512, 512), fov_rows=fov, ribs=rib_at(dets, 0, n_pairs=1, confidence=0.8))
    assert levels_of(a) == ["T12", "L1", "L2", "L3", "L4"] and a.anchor == "rib" and a.anchored
    assert not {"levels_unanchored", "levels_unknown", "level_count_conflict"} & set(a.study_flags)
    assert a.labelings == {"rib": ["T12", "L1", "L2", "L3", "L4"]} and a.rib_pairs_in_view == 1
    # the lowest rib-bearing body undetected: the count still runs through the gap
    gap = [d for k, d in enumerate(dets) if k != 2]
    a = assign_levels(gap, image_shape=(512, 512), fov_rows=fov, ribs=rib_at(dets, 0))
    assert levels_of(a) == ["T12", "L1", "L3", "L4"] and "level_gap" in a.study_flags


def test_sacrum_alone_and_no_anchor():
    dets = spine()
    a = assign_levels(dets, image_shape=(512, 512))
    assert a.anchor == "sacrum" and a.labelings == {"sacrum": BODIES + ["S1"]} and a.rib_pairs_in_view is None
    a = assign_levels(spine(5, sacrum=False), image_shape=(512, 512))
    assert a.anchor is None and not a.anchored and a.labelings == {}
    assert "levels_unanchored" in a.study_flags and levels_of(a) == ["L1", "L2", "L3", "L4", "L5"]


@pytest.mark.parametrize("last_rib, labels, conflict", [
    # the last rib-bearing body (T12) cut by the top of the field of view: the top body in view is L1
    ("T12", ["L1", "L2", "L3", "L4", "L5"], False),
    # 11 rib pairs, T11 cut off: its ribs above T12 say T12 is L1, the sacrum disagrees
    ("T11", ["L1", "L2", "L3", "L4", "L5", None], True),
])
def test_rib_body_cut_by_the_top_of_the_field_of_view(last_rib, labels, conflict):
    dets = spine()
    # T11 (and with 12 ribs T12) out of view above: the last rib's joints one pitch above the top body in view
    cut = 2 if last_rib == "T12" else 1
    shown = dets[cut:]
    a = assign_levels(shown, image_shape=(512, 512), ribs=rib_at(shown, 0, dy=4.0 - PITCH))
    assert "rib_body_above_detections" in a.study_flags and "rib_anchor_untied" not in a.study_flags
    assert a.labelings["rib"] == labels + ["S1"]
    assert a.labelings["sacrum"] == BODIES[cut:] + ["S1"]
    assert ("level_count_conflict" in a.study_flags) == conflict
    assert levels_of(a) == BODIES[cut:] + ["S1"]  # the sacrum's count either way
    if not conflict:
        assert a.anchor == "sacrum+rib"


def test_unusable_rib_anchor_is_reported_not_counted_from():
    dets = spine()
    # one rib of a single level (confidence 0.48): not counted from, even against the sacrum
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 3, n_pairs=1, confidence=0.48))
    assert a.anchor == "sacrum" and "rib" not in a.labelings and "rib_anchor_low_confidence" in a.study_flags
    assert "level_count_conflict" not in a.study_flags and a.rib_pairs_in_view == 1
    # joints half-way between two bodies: no body to tie them to
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 1, dy=PITCH / 2))
    assert a.anchor == "sacrum" and "rib_anchor_untied" in a.study_flags
    # joints 1.5 pitches above the cranial-most body: neither its body nor the one above it: untied
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 0, dy=-1.5 * PITCH))
    assert a.anchor == "sacrum" and "rib_anchor_untied" in a.study_flags
    # no vertebral body at all: nothing to count, the rib count still reported
    a = assign_levels([], image_shape=(512, 512), ribs=RibLevel(row=100.0, n_pairs=2, confidence=1.0))
    assert a.rib_pairs_in_view == 2 and "no_vertebrae_detected" in a.study_flags


# --------------------------------------------------------------------------------- through the measurement
def _truth_detections(sag, labels: Volume):
    """Ground-truth masks as detections: one per label value seen in the sagittal image (S1 → class 1)."""
    L = sample_volume_to_sagittal(sag, labels)[1]
    boxes, masks, classes, names = [], [], [], []
    for value in range(1, len(LEVELS) + 1):
        m = L == value
        if m.sum() < 200:
            continue
        r, c = np.nonzero(m)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
        masks.append(m)
        classes.append(level_class(LEVELS[value - 1]))
        names.append(LEVELS[value - 1])
    dets = dict(boxes=np.array(boxes, float), scores=np.ones(len(boxes)), classes=np.array(classes), bmd=None,
                masks=np.stack(masks))
    return dets, names


@pytest.fixture(scope="module")
def phantom():
    st = generate_study(0, PhantomOptions(preview=False))
    aff = np.asarray(st.affine, float)
    return Volume(st.hu, aff), Volume(st.labels.astype(np.float32), aff), st


def _crop(vol: Volume, keep: np.ndarray) -> Volume:
    k = np.nonzero(keep)[0]
    aff = vol.affine.copy()
    aff[:3, 3] = vol.affine[:3, :3] @ [0.0, 0.0, float(k[0])] + vol.affine[:3, 3]
    return Volume(np.ascontiguousarray(vol.data[k[0]:k[-1] + 1]), aff)


@pytest.mark.parametrize("fov", ["whole", "no_sacrum", "no_ribs"])
def test_phantom_levels_from_both_anchors_or_the_one_in_view(phantom, fov):
    vol, lab, st = phantom
    z = vol.affine[2, 3] + vol.affine[2, 2] * np.arange(vol.data.shape[0])
    lv = st.params["levels"]
    if fov == "no_sacrum":  # the scan ends in L4: the sacrum out of view, the ribs in
        keep = z > lv["L4"]["center"][2] - 0.3 * lv["L4"]["height_mm"]
    elif fov == "no_ribs":  # the scan starts in L1: no rib in view
        keep = z < lv["L1"]["center"][2] + 0.3 * lv["L1"]["height_mm"]
    else:
        keep = np.ones(len(z), bool)
    vol, lab = _crop(vol, keep), _crop(lab, keep)
    cfg = get_bmd_cfg()
    sag = sagittal_from_cfg(vol, cfg)
    dets, names = _truth_detections(sag, lab)
    calls = []
    with _timed_anchor_steps(calls):  # tools/benchmark.py's anchor timing sees the measurement's one rib search
        res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration())
    assert len(calls) == 1 and 0.0 < calls[0] < 5.0
    lv = res.levels
    expected = {"whole": "sacrum+rib", "no_sacrum": "rib", "no_ribs": "sacrum"}[fov]
    assert lv["levels_anchor"] == expected, (lv, res.qc_flags)
    truth = names  # every ground-truth body keeps its own name (cranial → caudal, as the result lists them)
    assert [v.level for v in res.vertebrae] == truth, ([v.level for v in res.vertebrae], truth)
    assert not {"levels_unanchored", "levels_unknown", "level_count_conflict"} & set(res.qc_flags)
    if fov == "no_ribs":
        assert lv["rib_pairs_in_view"] is None and lv["rib_anchor"] is None
    else:
        assert lv["rib_pairs_in_view"] == 2 and lv["rib_anchor"]["n_pairs"] == 2
        assert all(lab == truth for lab in lv["level_labelings"].values())
    json.dumps(res.to_dict())


def test_real_ct_is_labelled_t12_to_l5_by_both_anchors_agreeing():
    ct = os.path.join(os.path.dirname(__file__), "data", "real", "totalseg_example_ct")
    vol = load_nifti(os.path.join(ct, "example_ct.nii.gz"))
    lab = load_nifti(os.path.join(ct, "totalseg_vertebrae_pp_refined.nii.gz"), dtype=np.int16)
    cfg = get_bmd_cfg()
    sag = sagittal_from_cfg(vol, cfg)
    L = sample_volume_to_sagittal(sag, lab)[1]
    values = [19, 20, 21, 22, 23, 24]  # T12 … L5 in this file's label values
    masks = np.stack([L == v for v in values])
    boxes = []
    for m in masks:
        r, c = np.nonzero(m)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    dets = dict(boxes=np.array(boxes, float), scores=np.ones(6), classes=np.zeros(6, int), masks=masks, bmd=None)
    res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration())
    assert [v.level for v in res.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    # the detector-free sacrum (its sacroiliac joints in 3-D) and the last rib give the same count
    lv = res.levels
    assert lv["levels_anchor"] == "sacrum+rib" and lv["sacrum_source"] == "3d" and lv["rib_pairs_in_view"] == 1
    assert lv["level_labelings"] == {"sacrum": ["T12", "L1", "L2", "L3", "L4", "L5"],
                                     "rib": ["T12", "L1", "L2", "L3", "L4", "L5"]}
    assert lv["sacrum_anchor"]["confidence"] >= 0.8 and lv["convention"] == "sacrum and last rib agree"
    assert not {"level_count_conflict", "possible_transitional_anatomy"} & set(res.qc_flags)
    assert not {"levels_unanchored", "levels_unknown"} & set(res.qc_flags)


# ------------------------------------------------------------------------------------- the 3-D sacrum in the rule
def sacrum3d_at(dets, k, offset=0.6, confidence=1.0):
    """The top of the sacroiliac joints ``offset`` pitches below the centre of body ``k``."""
    return SacrumLevel(row=dets[k].centroid[1] + offset * PITCH, confidence=confidence)


def test_3d_sacrum_alone_anchors_the_count_and_agrees_with_the_rib():
    dets = spine(sacrum=False)
    a = assign_levels(dets, image_shape=(512, 512), sacrum3d=sacrum3d_at(dets, 6))
    assert a.anchor == "sacrum" and a.sacrum_source == "3d" and levels_of(a) == BODIES
    a = assign_levels(dets, image_shape=(512, 512), sacrum3d=sacrum3d_at(dets, 6), ribs=rib_at(dets, 1))
    assert a.anchor == "sacrum+rib" and a.labelings == {"sacrum": BODIES, "rib": BODIES}
    assert not {"level_count_conflict", "possible_transitional_anatomy", "levels_unanchored"} & set(a.study_flags)
    # joints rising to the height of L5's centre (a steep real sacrum): still below L5
    a = assign_levels(dets, image_shape=(512, 512), sacrum3d=sacrum3d_at(dets, 6, offset=-0.2), ribs=rib_at(dets, 1))
    assert a.anchor == "sacrum+rib" and levels_of(a) == BODIES


def test_3d_sacrum_above_a_fused_body_flags_it_and_conflicts_with_the_rib():
    # sacralised L5: the joints start at L5's top, L5's centre lies 0.5 pitch below them
    dets = spine(sacrum=False)
    a = assign_levels(dets, image_shape=(512, 512), sacrum3d=sacrum3d_at(dets, 6, offset=-0.5), ribs=rib_at(dets, 1))
    assert {"possible_transitional_anatomy", "level_count_conflict"} <= set(a.study_flags)
    assert "possible_transitional_anatomy" in a.flags[a.order[-1]]
    assert a.labelings["rib"] == BODIES  # the anatomically right count is among those reported
    assert a.labelings["sacrum"] == BODIES[1:] + [None]  # counted from the fused mass: L4 is called L5
    assert a.anchor == "sacrum" and levels_of(a)[-2] == "L5" and levels_of(a)[-1] is None
    assert "below_labelled_range" in a.flags[a.order[-1]]


def test_3d_sacrum_cross_checks_the_detector_sacrum():
    dets = spine()
    agree = assign_levels(dets, image_shape=(512, 512), sacrum3d=sacrum3d_at(dets, 6))
    assert agree.anchor == "sacrum" and agree.sacrum_source == "detector+3d" and levels_of(agree) == BODIES + ["S1"]
    assert agree.labelings == {"sacrum": BODIES + ["S1"], "sacrum_3d": BODIES + ["S1"]}
    assert not {"level_count_conflict", "level_gap"} & set(agree.study_flags)
    # lumbarised S1: the detector takes the free S1 for the sacrum, the joints start one level lower
    dets = spine(8, sacrum=False)[:7] + [spine()[-1]]
    low = SacrumLevel(row=dets[6].centroid[1] + 1.6 * PITCH, confidence=1.0)
    a = assign_levels(dets, image_shape=(512, 512), sacrum3d=low, ribs=rib_at(dets, 1))
    assert a.study_flags == ["level_count_conflict"] and a.anchor == "sacrum" and levels_of(a) == BODIES + ["S1"]
    assert a.labelings["rib"] == a.labelings["sacrum"] == BODIES + ["S1"]
    assert a.labelings["sacrum_3d"] == [None] + BODIES[:-1] + ["S1"]  # the free S1 counted as a missed L5


def test_low_confidence_3d_sacrum_is_reported_not_counted_from():
    dets = spine(sacrum=False)
    fov = (0, int(dets[-1].box[3]) + 5)
    a = assign_levels(dets, image_shape=(512, 512), fov_rows=fov, sacrum3d=sacrum3d_at(dets, 6, confidence=0.45))
    assert a.anchor is None and "sacrum_3d_low_confidence" in a.study_flags and "levels_unknown" in a.study_flags


@pytest.fixture(scope="module")
def phantom_v6():
    def make(**kw):
        st = generate_study(0, PhantomOptions(preview=False, generator_version=6, **kw))
        aff = np.asarray(st.affine, float)
        return Volume(st.hu, aff), Volume(st.labels.astype(np.float32), aff), st
    return make


def _measure_v6(vol, lab, st, keep=None):
    from bmd_d2.evaluation.benchmark_levels import expected_labeling, truth_detections

    if keep is not None:
        vol, lab = _crop(vol, keep), _crop(lab, keep)
    cfg = get_bmd_cfg()
    sag = sagittal_from_cfg(vol, cfg)
    dets, names = truth_detections(sag, lab, st.params["level_anchors"]["lumbar_vertebrae"])
    res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration())
    return res, names, expected_labeling(names)


# every branch of the rule on v6 phantoms with known anatomy, the sacrum never detected (as on the real CT): the
# 3-D anchors alone
@pytest.mark.parametrize("case", ["normal", "ribs11", "ribs13", "lumbar4", "lumbar6"])
def test_v6_phantom_anchors_agree_or_conflict_with_the_right_labeling_reported(phantom_v6, case):
    kw = {"normal": {}, "ribs11": {"rib_pairs": 11}, "ribs13": {"rib_pairs": 13}, "lumbar4": {"lumbar_vertebrae": 4},
          "lumbar6": {"lumbar_vertebrae": 6}}[case]
    vol, lab, st = phantom_v6(**kw)
    res, names, want = _measure_v6(vol, lab, st)
    lv = res.levels
    assert lv["sacrum_source"] == "3d" and lv["rib_pairs_in_view"] == {"ribs11": 1, "ribs13": 3}.get(case, 2)
    if case == "normal":
        assert lv["levels_anchor"] == "sacrum+rib" and [v.level for v in res.vertebrae] == want
        assert not {"level_count_conflict", "possible_transitional_anatomy"} & set(res.qc_flags)
        return
    assert "level_count_conflict" in res.qc_flags and lv["levels_anchor"] == "sacrum"
    right = "sacrum" if case.startswith("ribs") else "rib"
    assert lv["level_labelings"][right] == want, (lv["level_labelings"], want)
    other = "rib" if right == "sacrum" else "sacrum"
    assert lv["level_labelings"][other] != want and "anchors disagree" in lv["convention"]
    if case == "lumbar4":
        assert "possible_transitional_anatomy" in res.qc_flags


@pytest.mark.parametrize("fov", ["no_ribs", "no_pelvis", "neither"])
def test_v6_phantom_one_anchor_or_none(phantom_v6, fov):
    vol, lab, st = phantom_v6()
    z = vol.affine[2, 3] + vol.affine[2, 2] * np.arange(vol.data.shape[0])
    lv = st.params["levels"]
    below_ribs = z < lv["L1"]["center"][2] + 0.3 * lv["L1"]["height_mm"]  # the scan starts in L1
    above_pelvis = z > lv["L4"]["center"][2] - 0.3 * lv["L4"]["height_mm"]  # the scan ends in L4
    keep = {"no_ribs": below_ribs, "no_pelvis": above_pelvis, "neither": below_ribs & above_pelvis}[fov]
    res, names, want = _measure_v6(vol, lab, st, keep)
    levels = res.levels
    if fov == "no_ribs":
        assert levels["levels_anchor"] == "sacrum" and levels["rib_pairs_in_view"] is None
        assert [v.level for v in res.vertebrae] == want
    elif fov == "no_pelvis":
        assert levels["levels_anchor"] == "rib" and levels["sacrum_anchor"] is None
        assert [v.level for v in res.vertebrae] == want
    else:
        assert levels["levels_anchor"] is None and "levels_unanchored" in res.qc_flags
