"""Reports of a non-empty result (ground-truth masks of a phantom): CSV/JSON agree, table, overlay, masks mapped back."""
import csv
import io
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import Volume
from bmd_d2.levels import LEVEL_TO_LABEL
from bmd_d2.phantoms import PhantomOptions, generate_study
from bmd_d2 import reports
from bmd_d2.measure.classical import Calibration
from bmd_d2.measure.predictor import measure_detections

sys.path.insert(0, os.path.dirname(__file__))
from test_measure_classical import _gt_detections, truth_sagittal  # noqa: E402


@pytest.fixture(scope="module")
def result():
    cfg = get_bmd_cfg("configs/quick_schedules/bmd_rcnn_MFEFPN_instant_test.yaml")
    st = generate_study(3, PhantomOptions.tiny(metal=False, fracture=False, scoliosis=False))
    vol = Volume(st.quantized_hu(), st.affine, meta={"source": "phantom", "Modality": "CT"})
    sag = truth_sagittal(st, vol, cfg)
    dets, _ = _gt_detections(st, sag)
    res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration(), study_id="ph3")
    return st, res


def test_reports_agree_and_masks_map_back(result, tmp_path):
    st, res = result
    paths = reports.write_study(res, str(tmp_path), masks=True)
    d = json.loads(open(paths["json"]).read())
    rows = list(csv.DictReader(io.StringIO(open(paths["csv"]).read())))
    assert len(rows) == len(d["vertebrae"]) == len(res.vertebrae) >= 5
    assert list(rows[0]) == reports.VERTEBRA_COLUMNS
    for r, v in zip(rows, d["vertebrae"]):
        assert r["level"] == v["level"] and float(r["trabecular_hu"]) == pytest.approx(v["trabecular_hu"], rel=1e-5)
        assert float(r["learned_bmd_mg_cm3"]) == pytest.approx(v["learned_bmd"], rel=1e-5)
    assert d["patient"]["acr_levels"] == ["L1", "L2"] and d["patient"]["acr_category"]
    table = reports.format_table(res)
    assert "L1" in table and "ACR QCT (L1+L2)" in table
    assert open(paths["overlay"], "rb").read(4) == b"\x89PNG"
    from PIL import Image

    with Image.open(paths["overlay"]) as im:  # the report picture (its layout: tests/test_report_picture.py)
        assert im.mode == "RGB" and im.size[0] <= 1600
    # masks.nii.gz: same geometry as labels; each level's voxels lie inside the true body of that level
    img = nib.load(paths["masks"])
    lab = np.transpose(np.asarray(img.dataobj), (2, 1, 0))
    assert lab.shape == st.labels.shape
    assert np.allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine, st.affine)
    for v in res.vertebrae:
        m = lab == LEVEL_TO_LABEL[v.level]
        assert m.sum() > 0
        assert (st.labels[m] == LEVEL_TO_LABEL[v.level]).mean() > 0.8, v.level
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert reports.is_finished(str(tmp_path))
