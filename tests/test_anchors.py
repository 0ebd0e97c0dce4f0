"""3-D level anchors (bmd_d2.measure.anchors): what is proven so far (the sacrum is not yet reliable: see issue 18)."""
import json
import os

import numpy as np

from bmd_d2.data.dicom import Volume, load_nifti
from bmd_d2.data.sagittal import find_midsagittal_plane
from bmd_d2.measure.anchors import find_ribs, find_sacrum

REAL = os.path.join(os.path.dirname(__file__), "data", "real", "totalseg_example_ct")


def test_no_bone_gives_no_anchor():
    rng = np.random.default_rng(0)
    vol = Volume((40.0 + 5.0 * rng.standard_normal((40, 64, 64))).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    pl = find_midsagittal_plane(vol)
    assert find_sacrum(vol, pl) is None
    assert find_ribs(vol, pl) is None


def test_real_ct_lowest_rib_pair_is_at_t12():
    vol = load_nifti(os.path.join(REAL, "example_ct.nii.gz"))
    lab = load_nifti(os.path.join(REAL, "totalseg.nii.gz"), dtype=np.int16)
    pl = find_midsagittal_plane(vol)
    ribs = find_ribs(vol, pl)
    assert ribs is not None and ribs.n_pairs == 1
    low = ribs.pairs[-1]
    assert low.left and low.right
    t12 = vol.index_to_lps(np.argwhere(lab.data == 32)[:, ::-1].astype(float))[:, 2]
    assert t12.min() <= ribs.lowest_z_mm <= t12.max()
    json.dumps(ribs.to_dict())
