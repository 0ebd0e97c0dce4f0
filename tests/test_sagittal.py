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
