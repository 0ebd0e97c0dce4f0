"""A BMD head that learns the measurement's own bias (``MODEL.ROI_BMD_HEAD.TARGET "hu_correction"``): its loss uses
``gt_trabecular_hu - gt_core_hu``, its output ``pred_hu_correction`` is added to the measured core HU before the
study's calibration, and ``core_hu`` annotations reach the instances (through the intensity augmentation) and come
from matching measured vertebrae to annotations by mask."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _model_fixtures import synthetic_sample, tiny_cfg
from bmd_d2.evaluation.core_hu import annotate_core_hu, match_core_hu
from bmd_d2.measure.classical import Calibration
from bmd_d2.modeling.test_time_augmentation import merge_tta_passes
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

CORR = {"MODEL.ROI_BMD_HEAD.TARGET": "hu_correction", "MODEL.ROI_BMD_HEAD.BMD_MEAN": 0.0,
        "MODEL.ROI_BMD_HEAD.BMD_STD": 10.0, "MODEL.ROI_BMD_HEAD.LOSS_TYPE": "l1"}


def _sample(hu, core):
    s = synthetic_sample()
    s["instances"].gt_trabecular_hu = torch.tensor(hu, dtype=torch.float32)
    s["instances"].gt_core_hu = torch.tensor(core, dtype=torch.float32)
    s["instances"].gt_bmd = torch.full((len(hu),), float("nan"))
    return s


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**CORR, **overrides))
    model.train()
    return model


def test_correction_loss_is_the_target_minus_the_measured_core():
    model = _model()
    head = model.roi_heads.bmd_head
    assert head.target == "hu_correction" and head.pred_field == "pred_hu_correction"
    n = len(synthetic_sample()["instances"])
    with EventStorage(0):
        # the predictor starts at ~0 HU of correction: a core that reads the target costs ~nothing, one 30 HU
        # (3 STD) off costs ~3, whatever the HU itself is
        exact = float(model([_sample([180.0] * n, [180.0] * n)])["loss_bmd"].detach())
        off = float(model([_sample([180.0] * n, [150.0] * n)])["loss_bmd"].detach())
        high = float(model([_sample([400.0] * n, [370.0] * n)])["loss_bmd"].detach())
        # an unmeasured core (NaN) makes the instance's target unknown: ignored
        none = model([_sample([180.0] * n, [float("nan")] * n)])["loss_bmd"]
    assert exact < 0.2 and 2.5 < off < 3.5 and abs(off - high) < 0.2, (exact, off, high)
    assert float(none) == 0.0 and none.requires_grad
    s = _sample([180.0] * n, [180.0] * n)
    s["instances"].remove("gt_core_hu")
    with EventStorage(0), pytest.raises(KeyError, match="gt_core_hu"):
        model([s])


def test_correction_head_predicts_a_correction():
    model = _model(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    model.eval()
    with torch.no_grad():
        out = model([synthetic_sample()])[0]["instances"]
    assert len(out) > 0 and out.has("pred_hu_correction")
    assert not out.has("pred_trabecular_hu") and not out.has("pred_bmd")
    assert torch.isfinite(out.pred_hu_correction).all()


def test_tta_merges_the_correction():
    def _pass(corr):
        return {"boxes": np.array([[0, 0, 10, 10]], float), "scores": np.array([0.9]), "classes": np.array([0]),
                "masks": np.ones((1, 12, 12), bool), "bmd": None, "hu": None, "hu_correction": np.array(corr, float)}
    out = merge_tta_passes([_pass([-4.0]), _pass([-6.0])])
    np.testing.assert_allclose(out["hu_correction"], [-5.0])


@pytest.mark.parametrize("core_3d", [True, False])
def test_measurement_adds_the_correction_to_the_measured_core(core_3d, monkeypatch):
    """learned HU = 3-D core HU (or, without one, the sagittal ROI's HU) + the correction, then the calibration."""
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.levels import Detection
    from bmd_d2.measure import vertebrae as V

    m = get_bmd_cfg().MEASURE
    cal = Calibration(slope=1.25, intercept=10.0, source="test")
    core = SimpleNamespace(hu=140.0 if core_3d else None, n=500 if core_3d else 0, trimmed=0,
                           reason=None if core_3d else "no_volume", detail="")
    monkeypatch.setattr(V, "_core", lambda *a, **k: core)
    dets = V.detection_arrays({"boxes": [[0, 0, 4, 4]], "scores": [0.9], "classes": [0],
                               "masks": np.ones((1, 8, 8), bool), "bmd": None, "hu": None,
                               "hu_correction": np.array([-5.0])}, (8, 8))
    cand = V.Candidate(index=0, flags=[], roi=np.ones((8, 8), bool), hu=122.5, sd=10.0, n=64)
    v = V.measure_vertebra(dets, cand, Detection(0, 0.9, (0, 0, 4, 4), (2.0, 2.0)), "L1", [], cal, m,
                           V.roi_geometry(m, 1.0, None), volume=None, transform=np.eye(4))
    assert v.learned_hu_correction == -5.0
    measured = 140.0 if core_3d else 122.5
    assert v.learned_hu == pytest.approx(measured - 5.0)
    assert v.learned_bmd == pytest.approx((measured - 5.0 - 10.0) / 1.25)
    assert ("no_3d_core" in v.qc_flags) is (not core_3d)


def test_match_core_hu_by_mask_and_class():
    a = np.zeros((2, 20, 20), bool)
    a[0, 2:8, 2:8] = True
    a[1, 12:18, 12:18] = True
    meas = [SimpleNamespace(mask=np.roll(a[1], 1, axis=0), category_id=0, trabecular_hu_3d=210.0),
            SimpleNamespace(mask=a[0], category_id=0, trabecular_hu_3d=None),      # matched, no core measured
            SimpleNamespace(mask=a[1], category_id=1, trabecular_hu_3d=999.0)]     # other class: never taken
    assert match_core_hu(list(a), [0, 0], meas) == [None, 210.0]
    far = [SimpleNamespace(mask=np.roll(a[1], 5, axis=1), category_id=0, trabecular_hu_3d=1.0)]
    assert match_core_hu(list(a), [0, 0], far) == [None, None]   # IoU below 0.5


def test_annotate_core_hu_names_the_file_and_the_missing_series(tmp_path):
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.errors import BMDError

    with pytest.raises(BMDError, match="annotations file not found"):
        annotate_core_hu(tmp_path / "missing.json", get_bmd_cfg())
    f = tmp_path / "annotations.json"
    f.write_text(json.dumps({"images": [{"id": 3, "height": 8, "width": 8}], "annotations": []}))
    with pytest.raises(BMDError, match="image 3 has no series_dir"):
        annotate_core_hu(f, get_bmd_cfg())


def test_annotate_core_hu_command_gives_a_one_line_error(tmp_path, capsys):
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tools"))
    import annotate_core_hu as tool

    rc = tool.main([str(tmp_path / "nothing.json"), "--config-file", os.path.join(root, "configs", "bmd_default.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "annotations file not found" in err and "nothing.json" in err
