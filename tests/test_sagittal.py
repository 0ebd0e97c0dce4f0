"""Mid-sagittal plane, 3-slice image, crop/pad/scale and the exact pixel <-> LPS transform."""
import os

import numpy as np
import pytest

from _dicom_fixtures import block_phantom
from bmd_d2.data.dicom import Volume, load_nifti
from bmd_d2.data.sagittal import (find_midsagittal_plane, make_sagittal, sagittal_mask_to_volume,
                                  sample_volume_to_sagittal, window_hu)

REAL = os.path.join(os.path.dirname(__file__), "data", "real", "totalseg_example_ct")


def _volume(cx=0.0, rot=0.0, shape=(60, 96, 96), spacing=(2.0, 1.5, 1.5)):
    hu, lab = block_phantom(shape=shape, spacing=spacing, centre_x_mm=cx, rotation_deg=rot)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([spacing[2], spacing[1], spacing[0]])
    K, J, I = shape
    aff[:3, 3] = [-(I - 1) / 2 * spacing[2], -(J - 1) / 2 * spacing[1], -(K - 1) / 2 * spacing[0]]
    return Volume(hu, aff), Volume(lab.astype(np.float32), aff)


@pytest.mark.parametrize("cx,rot", [(0.0, 0.0), (20.0, 0.0), (-15.0, 12.0), (10.0, -20.0)])
def test_plane_follows_offcentre_rotated_spine(cx, rot):
    vol, _ = _volume(cx, rot)
    pl = find_midsagittal_plane(vol)
    assert pl.info["method"] == "symmetry"
    th = np.radians(rot)
    true_n = np.array([np.cos(th), np.sin(th), 0.0])
    assert abs(np.dot(pl.normal, true_n)) > np.cos(np.radians(3.0))
    # the spine's centre line (x = cx at y = 0 in spine coordinates) lies in the plane
    centre = np.array([cx, 0.0, 0.0])
    assert abs(np.dot(centre - pl.point, pl.normal)) < 2.0


def test_image_contract_and_transform():
    vol, lab = _volume(12.0, 8.0)
    sag = make_sagittal(vol, spacing=1.0, size=128)
    assert sag.image.shape == (128, 128, 3) and sag.image.dtype == np.uint8
    assert sag.hu.shape == (3, 128, 128) and sag.hu.dtype == np.float32
    np.testing.assert_array_equal(sag.image, window_hu(sag.hu, 1000, 350).transpose(1, 2, 0))
    # rows head -> feet, columns anterior -> posterior, square spacing
    T = sag.transform
    assert np.linalg.norm(T[:3, 0]) == pytest.approx(sag.spacing) == pytest.approx(np.linalg.norm(T[:3, 1]))
    assert T[2, 1] < 0 and T[1, 0] > 0
    # channel 1 = plane: its pixel centres are at distance 0 from the plane; channels 0/2 at -/+1 mm
    p = sag.pixel_to_lps([10, 50], [20, 70], channel=1)
    assert np.allclose((p - sag.info["plane_point"]) @ np.array(sag.info["plane_normal"]), 0, atol=1e-6)
    d = sag.pixel_to_lps(10, 20, channel=2) - sag.pixel_to_lps(10, 20, channel=1)
    assert np.linalg.norm(d) == pytest.approx(1.0)
    # round trip
    back = sag.lps_to_pixel(p)
    np.testing.assert_allclose(back, [[10, 20, 1], [50, 70, 1]], atol=1e-9)
    # HU at a pixel = the volume sampled at its LPS point
    from scipy import ndimage
    ijk = vol.lps_to_index(sag.pixel_to_lps(64, 64, channel=1))
    ref = ndimage.map_coordinates(vol.data, [[ijk[2]], [ijk[1]], [ijk[0]]], order=1)[0]
    assert sag.hu[1, 64, 64] == pytest.approx(ref, abs=1e-3)
    assert not sag.info["cut"] and sag.info["scale"] == 1.0


def test_labels_into_image_and_mask_back_into_volume():
    vol, lab = _volume(-10.0, 10.0)
    sag = make_sagittal(vol, spacing=1.0, size=128)
    L = sample_volume_to_sagittal(sag, lab)  # nearest neighbour
    assert L.shape == (3, 128, 128)
    assert set(np.unique(L[1])) - {0} == set(np.unique(lab.data)) - {0}  # every vertebra is in the image
    back = sagittal_mask_to_volume(sag, L[1].astype(np.uint8), vol.data.shape, vol.affine, thickness_mm=3.0)
    hit = back > 0
    assert hit.sum() > 100
    agree = (back[hit] == lab.data[hit].astype(np.uint8)).mean()
    assert agree > 0.95
    # voxels set lie within the slab around the plane
    ijk = np.argwhere(hit)[:, ::-1]
    dist = (vol.index_to_lps(ijk) - sag.info["plane_point"]) @ np.array(sag.info["plane_normal"])
    assert np.abs(dist).max() <= 1.5 + 1e-6


def test_scaled_not_cut_when_spine_too_long():
    vol, _ = _volume(0.0, 0.0, shape=(100, 64, 64), spacing=(2.0, 2.0, 2.0))  # 200 mm of spine
    sag = make_sagittal(vol, spacing=1.0, size=96)
    assert sag.info["scale"] < 1.0 and not sag.info["cut"]
    assert sag.spacing == pytest.approx(1.0 / sag.info["scale"])
    assert any("scaled" in w for w in sag.info["warnings"])


def test_padding_with_air_for_small_volume():
    vol, _ = _volume(0.0, 0.0, shape=(30, 48, 48), spacing=(2.0, 2.0, 2.0))
    sag = make_sagittal(vol, spacing=1.0, size=256)
    assert sag.info["pad_px"]["top"] > 0 and sag.image[0, 0, 1] == 0


def test_fallback_without_bone():
    vol = Volume(np.full((20, 32, 32), 40.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    sag = make_sagittal(vol, size=64)
    assert sag.info["plane"]["method"] == "fallback" and sag.info["warnings"]


def test_real_ct_midplane_contains_vertebral_bodies():
    vol = load_nifti(os.path.join(REAL, "example_ct.nii.gz"))
    lab = load_nifti(os.path.join(REAL, "totalseg_vertebrae_pp_refined.nii.gz"), dtype=np.int16)
    sag = make_sagittal(vol)
    L = sample_volume_to_sagittal(sag, lab)[1]
    assert set(range(19, 25)) <= set(np.unique(L).tolist())  # T12..L5 bodies cut by the plane
    assert not sag.info["cut"]


# ----------------------------------------------------------------------------- fast helpers == their scipy references
def test_coarse_grid_matches_block_mean_and_affine_transform():
    """The slice-wise separable resampling gives ndimage.affine_transform's trilinear values (float32 rounding) on
    axis-aligned volumes, flipped axes and int16 data, and the general path is used for oblique ones."""
    from scipy import ndimage

    from bmd_d2.data.sagittal import _AIR_HU, _coarse_lps

    def reference(vol, step=2.0):  # the plain method: block mean, then one affine_transform
        K, J, I = vol.data.shape
        lps = vol.index_to_lps(np.array([[i, j, k] for i in (0, I - 1) for j in (0, J - 1) for k in (0, K - 1)], float))
        lo, hi = lps.min(0), lps.max(0)
        f = [max(1, int(step // d)) for d in vol.spacing]
        Kc, Jc, Ic = K // f[0] * f[0], J // f[1] * f[1], I // f[2] * f[2]
        data = vol.data[:Kc, :Jc, :Ic].astype(np.float64).reshape(Kc // f[0], f[0], Jc // f[1], f[1], Ic // f[2],
                                                                    f[2]).mean((1, 3, 5))
        aff = vol.affine.copy()
        for c, fc in zip((0, 1, 2), (f[2], f[1], f[0])):
            aff[:3, c] *= fc
        aff[:3, 3] = vol.index_to_lps(np.array([(f[2] - 1) / 2, (f[1] - 1) / 2, (f[0] - 1) / 2]))
        inv, rev = np.linalg.inv(aff), np.eye(3)[::-1]
        n = np.maximum(np.floor((hi - lo) / step).astype(int) + 1, 1)
        return ndimage.affine_transform(data, rev @ inv[:3, :3] @ rev * step, rev @ (inv[:3, :3] @ lo + inv[:3, 3]),
                                        output_shape=tuple(n[::-1]), order=1, mode="constant", cval=_AIR_HU,
                                        prefilter=False)

    rng = np.random.default_rng(0)
    data = np.rint(rng.normal(0, 300, (23, 40, 36))).astype(np.float32)
    aff = np.diag([0.7, 0.9, 0.65, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 30.0]
    flipped = aff.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 2] *= -1
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    oblique = aff.copy()
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ aff[:3, :3]
    for vol in (Volume(data, aff), Volume(data, flipped), Volume(data.astype(np.int16), aff), Volume(data, oblique),
                Volume(data, np.diag([2.5, 2.5, 3.0, 1.0]))):
        C, lo, step = _coarse_lps(vol, 2.0)
        ref = reference(vol)
        assert C.dtype == np.float32 and C.shape == ref.shape
        np.testing.assert_allclose(C, ref, atol=2e-3)
        assert np.array_equal(C == _AIR_HU, ref == _AIR_HU)


def test_shift_disc_means_and_max_filter_match_scipy():
    from scipy import ndimage
    from scipy.signal import fftconvolve

    from bmd_d2.data.sagittal import _disc_kernel, _disc_means, _max_filter, _shifted

    rng = np.random.default_rng(1)
    a = rng.normal(0, 100, (61, 70))
    for dy, dx in [(10.0, -0.0), (12.5, 3.2), (-7.25, 14.0), (0.0, 0.0), (60.0, 0.0), (-70.5, 2.0), (9.999, -3.001)]:
        ref = ndimage.shift(a, (-dy, -dx), order=1, mode="constant", cval=7.0, prefilter=False)
        np.testing.assert_allclose(_shifted(a, dy, dx, 7.0), ref, rtol=0, atol=1e-9)
    radii = [(0.0, 5.0), (3.0, 7.5), (0.0, 2.0)]
    for got, r in zip(_disc_means(a, radii), radii):
        np.testing.assert_allclose(got, fftconvolve(a, _disc_kernel(*r), mode="same"), atol=1e-9)
    ty, tx = np.meshgrid(np.arange(-7, 8), np.arange(-4, 5), indexing="ij")
    foot = (ty / 7) ** 2 + (tx / 4) ** 2 <= 1.0
    m = np.maximum(a, 0).astype(np.float32)
    assert np.array_equal(_max_filter(m, foot), ndimage.maximum_filter(m, footprint=foot, mode="constant", cval=-1.0))


def test_symmetry_matches_loop_over_angles_and_shifts():
    from scipy import ndimage

    from bmd_d2.data.sagittal import _symmetry

    rng = np.random.default_rng(2)
    img = ndimage.gaussian_filter(rng.normal(0, 100, (80, 80)), 2)
    img += img[:, ::-1]  # roughly symmetric about x = 39.5
    angles = np.arange(-30, 30.5, 2.0)
    best = (0.0, 0.0, -np.inf)
    t = np.arange(-18, 19, dtype=float)
    V, U = np.meshgrid(np.arange(-12, 25, dtype=float), t, indexing="ij")
    for ang in angles:
        th = np.radians(ang)
        S = ndimage.map_coordinates(img, [41.0 + U * np.sin(th) + V * np.cos(th),
                                          38.0 + U * np.cos(th) - V * np.sin(th)], order=1, mode="nearest")
        F = S[:, ::-1]
        for m in range(-10, 11):
            a1, b1 = (S[:, m:], F[:, :S.shape[1] - m]) if m >= 0 else (S[:, :m], F[:, -m:])
            a1, b1 = a1 - a1.mean(), b1 - b1.mean()
            score = float((a1 * b1).sum() / np.sqrt((a1 * a1).sum() * (b1 * b1).sum()))
            if score > best[2]:
                best = (float(ang), m / 2.0, score)
    got = _symmetry(img, (41.0, 38.0), 18, angles, 10, (-12, 24))
    assert got[:2] == best[:2] and got[2] == pytest.approx(best[2], abs=1e-12)


def test_int16_volume_gives_the_float32_result():
    vol, _ = _volume(12.0, 8.0)
    v16 = Volume(np.rint(vol.data).astype(np.int16), vol.affine)
    v32 = Volume(np.rint(vol.data).astype(np.float32), vol.affine)
    a, b = make_sagittal(v32, spacing=1.0, size=128), make_sagittal(v16, spacing=1.0, size=128)
    np.testing.assert_allclose(a.transform, b.transform, atol=1e-9)
    assert b.hu.dtype == np.float32 and np.abs(a.hu - b.hu).max() < 1e-3
    assert np.array_equal(a.image, b.image)
