"""Mid-sagittal plane against phantom ground truth (vertebral-body labels and their centroids).

For each tiny phantom the plane found on the CT is compared with the truth:

* every labelled level must be cut by the plane (label area > 0 in channel 1 of the sagittal image);
* lateral error: the signed distance (along the plane normal) of each level's body-label centroid from the plane,
  minus that level's residual from the least-squares line ``x = a + b·z`` through all centroids (a scoliotic spine
  cannot lie in one plane; the residual is the part no plane can follow). A seed's error is the largest such value
  over its levels.
"""
import logging

import numpy as np
import pytest

from bmd_d2.data.dicom import Volume
from bmd_d2.phantoms import PhantomOptions, generate_study
from bmd_d2.data.sagittal import find_midsagittal_plane, make_sagittal, sample_volume_to_sagittal

SEEDS = list(range(20))


def plane_truth_errors(study, plane_point, plane_normal):
    """Per-level lateral error (mm) of a plane against the phantom's body-label centroids.

    Args:
        study: ``PhantomStudy`` (labels (K, J, I) uint8, affine (4, 4) LPS).
        plane_point: (3,) LPS mm.
        plane_normal: (3,) unit normal.

    Returns:
        (levels list of label values, errors float64 (L,) mm: |distance from plane − scoliosis residual|).
    """
    levels, cents = [], []
    for lv in sorted(set(np.unique(study.labels).tolist()) - {0}):
        kji = np.argwhere(study.labels == lv).mean(0)
        cents.append(study.affine[:3, :3] @ kji[::-1] + study.affine[:3, 3])
        levels.append(int(lv))
    P = np.asarray(cents)
    d = (P - np.asarray(plane_point)) @ np.asarray(plane_normal)
    A = np.stack([np.ones(len(P)), P[:, 2]], 1)
    coef = np.linalg.lstsq(A, P[:, 0], rcond=None)[0]
    res = P[:, 0] - A @ coef
    return levels, np.abs(d - res)


@pytest.fixture(scope="module")
def tiny_results():
    logging.getLogger("bmd_d2.data.sagittal").setLevel(logging.ERROR)
    out = {}
    for seed in SEEDS:
        st = generate_study(seed, PhantomOptions.tiny())
        vol = Volume(st.quantized_hu(), st.affine)
        sag = make_sagittal(vol)
        lab = sample_volume_to_sagittal(sag, Volume(st.labels.astype(np.float32), st.affine), order=0)[1]
        levels, err = plane_truth_errors(st, sag.info["plane_point"], sag.info["plane_normal"])
        out[seed] = dict(areas={lv: int((lab == lv).sum()) for lv in levels}, err=float(err.max()))
    return out


def test_every_labelled_level_is_in_the_plane(tiny_results):
    ok = [s for s, r in tiny_results.items() if min(r["areas"].values()) > 0]
    assert len(ok) >= 19, {s: r["areas"] for s, r in tiny_results.items() if s not in ok}


def test_lateral_error_against_truth(tiny_results):
    errs = np.array([r["err"] for r in tiny_results.values()])
    assert np.median(errs) <= 1.5, errs.round(1)
    # Generator v2 (coarse pixels, larger bodies): the Theil-Sen centreline gave 17/20 within 3 mm but tilted seeds 12
    # and 18 by their pelvic slabs (14 and 19 mm at S1); the consensus line gives 16/20 within 3 mm, worst 5.8 mm (and
    # on the 30 full-size validation phantoms mean 2.4 vs 2.7 mm, 5 vs 6 studies over 3 mm).
    # Generator v4 (ring-shaped posterior elements, less bone behind the canal): 18/20 within 3 mm, but seed 2
    # (contrast-enhanced kidneys, 7.3° scoliosis) 9.4 mm at T11 and 6.6 at S1 (5.3 / 3.1 with solid posterior elements).
    # On 30 full-size studies (validation seeds) the rings help: worst level per study mean 2.1 vs 3.6 mm, max 8.5 vs
    # 18.8 mm, 9 vs 13 studies over 3 mm.
    assert (errs <= 3.0).sum() >= 17, errs.round(1)
    assert errs.max() <= 10.0, errs.round(1)  # no plane tilted off the spine by its pelvic slabs (14-19 mm)


def test_contrast_study_not_fooled_by_enhanced_organs():
    # seed 2: contrast-enhanced kidneys (140–200 HU) lateral to the spine once drew the plane 60 mm off the spine
    st = generate_study(2, PhantomOptions.tiny(contrast=True))
    pl = find_midsagittal_plane(Volume(st.quantized_hu(), st.affine))
    _, err = plane_truth_errors(st, pl.point, pl.normal)
    assert err.max() < 15.0
