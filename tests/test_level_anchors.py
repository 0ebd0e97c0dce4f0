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
from bmd_d2.levels import LEVELS, Detection, RibLevel, assign_levels, level_class
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


def test_unusable_rib_anchor_is_reported_not_counted_from():
    dets = spine()
    # one rib of a single level (confidence 0.48): not counted from, even against the sacrum
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 3, n_pairs=1, confidence=0.48))
    assert a.anchor == "sacrum" and "rib" not in a.labelings and "rib_anchor_low_confidence" in a.study_flags
    assert "level_count_conflict" not in a.study_flags and a.rib_pairs_in_view == 1
    # joints half-way between two bodies: no body to tie them to
    a = assign_levels(dets, image_shape=(512, 512), ribs=rib_at(dets, 1, dy=PITCH / 2))
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


def test_real_ct_is_labelled_t12_to_l5_from_the_rib():
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
    assert res.levels["levels_anchor"] == "rib" and res.levels["rib_pairs_in_view"] == 1
    assert not {"levels_unanchored", "levels_unknown"} & set(res.qc_flags)
