"""Generator v6 (issue 18): the pelvis joined to the sacrum at sacroiliac joints, and transitional anatomy with its
truth; v5 stays what it was (the 3-D sacrum finder itself is tested in test_anchors.py, the counting rule in
test_level_anchors.py)."""
import numpy as np
import pytest
from scipy import ndimage

from bmd_d2.phantoms import PhantomOptions
from bmd_d2.phantoms.cli import build_parser, options_from_args
from bmd_d2.phantoms.dataset import generate_study


def _v(seed, version, **kw):
    return generate_study(seed, PhantomOptions(preview=False, generator_version=version, **kw))


def test_v6_options_are_validated():
    with pytest.raises(ValueError, match="rib_pairs need generator_version 6, got 5"):
        PhantomOptions(rib_pairs=13).validate()
    with pytest.raises(ValueError, match=r"rib_pairs must be one of \(11, 12, 13\), got 14"):
        PhantomOptions(generator_version=6, rib_pairs=14).validate()
    with pytest.raises(ValueError, match=r"lumbar_vertebrae must be one of \(4, 5, 6\), got 3"):
        PhantomOptions(generator_version=6, lumbar_vertebrae=3).validate()
    args = build_parser().parse_args(["--generator-version", "6", "--rib-pairs", "11", "--lumbar-vertebrae", "6"])
    opts = options_from_args(args)
    assert (opts.generator_version, opts.rib_pairs, opts.lumbar_vertebrae) == (6, 11, 6)
    with pytest.raises(ValueError, match="lumbar_vertebrae need generator_version 6"):
        options_from_args(build_parser().parse_args(["--lumbar-vertebrae", "4"]))


def test_v6_is_its_v5_twin_plus_the_pelvis():
    v5, v6 = _v(0, 5), _v(0, 6)
    assert v6.params["rib_pairs"] == 12 and v6.params["lumbar_vertebrae"] == 5  # seed 0 draws normal anatomy
    assert np.array_equal(v5.labels, v6.labels) and np.array_equal(v5.cores, v6.cores)
    assert [t["bmd_mg_cm3"] for t in v5.truth] == [t["bmd_mg_cm3"] for t in v6.truth]
    assert "level_anchors" not in v5.params
    truth = v6.params["level_anchors"]
    assert truth == {**truth, "rib_pairs": 12, "lumbar_vertebrae": 5, "transitional": False, "last_rib_level": "T12",
                     "sacrum_top_level": "S1"}
    # the sacrum's top is S1's superior endplate; the joints run from it down over the top two fused segments
    s1 = v6.params["levels"]["S1"]
    assert abs(truth["sacrum_top_lps"][2] - s1["center"][2]) < s1["height_mm"]
    z0, z1 = truth["si_joint_z_mm"]
    assert z0 < truth["sacrum_top_lps"][2] < z1 + 1.0 and 35.0 < z1 - z0 < 90.0
    # the bone the pelvis adds lies lateral of the vertebral bodies, inside the patient: the mid-sagittal slab is
    # unchanged and no air became bone
    x = v6.affine[0, 3] + v6.affine[0, 0] * np.arange(v6.hu.shape[2])
    mid = np.abs(x - s1["center"][0]) < 8.0
    diff = np.abs(v6.hu - v5.hu)
    assert diff[:, :, mid].max() < 1e-3 < diff.max()
    air, _ = ndimage.label(v5.hu < -500.0)
    edge = np.unique(np.concatenate([air[:, 0].ravel(), air[:, -1].ravel(), air[:, :, 0].ravel(),
                                     air[:, :, -1].ravel()]))
    outside = np.isin(air, edge[edge > 0])  # the air around the patient (bowel gas may lie under an iliac wing)
    assert outside.sum() > 1e5 and not (outside & (v6.hu > 0.0)).any()


def _midline_hu(st, pt):
    ijk = np.linalg.solve(st.affine, np.r_[pt, 1.0])[:3]
    return float(ndimage.map_coordinates(st.hu, [[ijk[2]], [ijk[1]], [ijk[0]]], order=1)[0])


@pytest.mark.parametrize("lumbar,top", [(4, "L5"), (6, "S2")])
def test_transitional_lumbosacral_anatomy_and_its_truth(lumbar, top):
    st = _v(0, 6, lumbar_vertebrae=lumbar, noise_sd=0.0)
    truth = st.params["level_anchors"]
    assert truth["transitional"] and truth["sacrum_top_level"] == top and truth["lumbar_vertebrae"] == lumbar
    lv = st.params["levels"]
    s1 = np.asarray(lv["S1"]["center"])
    if lumbar == 6:  # a full S1/S2 disc below the free S1: disc tissue on the midline, below S1's body
        top_pt = np.asarray(truth["sacrum_top_lps"])
        gap = _midline_hu(st, 0.5 * (s1 + top_pt) + 0.0 * s1)
        assert top_pt[2] < s1[2] - lv["S1"]["height_mm"] / 2 + 5.0
        assert _midline_hu(st, top_pt + [0, 0, 2.5]) < 150.0, gap
    else:  # the sacralised L5 tops the fused mass
        l5 = lv["L5"]
        assert abs(truth["sacrum_top_lps"][2] - l5["center"][2]) < l5["height_mm"]


@pytest.mark.parametrize("ribs,last", [(11, "T11"), (13, "L1")])
def test_rib_count_variants_and_their_truth(ribs, last):
    st, base = _v(0, 6, rib_pairs=ribs, noise_sd=0.0), _v(0, 6, noise_sd=0.0)
    assert st.params["level_anchors"]["last_rib_level"] == last and st.params["level_anchors"]["transitional"]
    diff = np.abs(st.hu - base.hu) > 50.0  # the rib drawn (13) or left out (11)
    z = st.affine[2, 3] + st.affine[2, 2] * np.arange(st.hu.shape[0])
    level = st.params["levels"]["L1" if ribs == 13 else "T12"]
    rows = z[diff.any((1, 2))]
    assert diff.sum() > 200 and rows.max() < level["center"][2] + level["height_mm"] and \
        rows.min() > level["center"][2] - 80.0
