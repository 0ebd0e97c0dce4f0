"""tools/eval_real_ct.py (bmd_d2.evaluation.real_ct): runs end to end on the real CT (random-init weights) and scores
masks correctly."""
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import load_nifti
from bmd_d2.data.sagittal import sample_volume_to_sagittal
from bmd_d2.evaluation import real_ct
from bmd_d2.measure.classical import Calibration
from bmd_d2.measure.predictor import measure_detections, sagittal_from_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
CT = os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct")


def _tool():
    spec = importlib.util.spec_from_file_location("eval_real_ct", os.path.join(ROOT, "tools", "eval_real_ct.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.quick
def test_runs_with_random_weights_and_writes_overlay(tmp_path, capsys):
    tool = _tool()
    rc = tool.main(["--config-file", QUICK, "--out", str(tmp_path), "MEASURE.SCORE_THRESHOLD", "0.0"])
    assert rc in (0, 1)  # random weights: the acceptance usually fails (1); never an error (2)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["level", "score", "overlaps", "Dice"]
    assert ("PASS" in out) == (rc == 0)
    assert (tmp_path / "overlay.png").stat().st_size > 1000
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["study_id"] == "example_ct"


def _ground_truth_result():
    cfg = get_bmd_cfg()
    vol = load_nifti(os.path.join(CT, "example_ct.nii.gz"))
    lab = load_nifti(os.path.join(CT, "totalseg_vertebrae_pp_refined.nii.gz"), dtype=np.int16)
    sag = sagittal_from_cfg(vol, cfg)
    L = sample_volume_to_sagittal(sag, lab)[1]
    masks = np.stack([L == v for v in range(19, 25)])
    boxes = []
    for m in masks:
        r, c = np.nonzero(m)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    dets = dict(boxes=np.array(boxes, float), scores=np.ones(6), classes=np.zeros(6, int), masks=masks,
                bmd=np.full(6, 120.0))
    return measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration()), lab


def test_ground_truth_masks_score_dice_one_and_pass():
    res, lab = _ground_truth_result()
    summary = real_ct.evaluate(res, lab)
    assert [r["level"] for r in summary["rows"]] == list(real_ct.REQUIRED)
    assert all(r["dice"] == pytest.approx(1.0) and r["best_label"] == r["level"] for r in summary["rows"])
    assert summary["missed"] == [] and real_ct.passes(summary, 0.85) == []
    # a level shifted by one is reported as mislabelled, a dropped one as missing, an eroded one by its Dice
    from scipy import ndimage

    verts = [dataclasses.replace(v) for v in res.vertebrae]
    verts[0].level = "T11"
    verts[2].mask = ndimage.binary_erosion(verts[2].mask, iterations=6)
    res.vertebrae = verts[:5]
    problems = real_ct.passes(real_ct.evaluate(res, lab), 0.85)
    assert any(p.startswith("T12: not detected") for p in problems)
    assert any(p.startswith("L2: Dice") for p in problems)
    assert any(p.startswith("L5: not detected") for p in problems)


DEFAULT_CFG = os.path.join(ROOT, "configs", "bmd_default.yaml")
# What the shipped default model gives on the real CT (tools/eval_real_ct.py --config-file configs/bmd_default.yaml;
# README "Real CT"; the default config merges a one-pixel-shifted pass and passes at 272² and 288²,
# MEASURE.TTA_SHIFTS / TTA_SIZES): per level the Dice against the TotalSegmentator body label in the sagittal plane,
# asserted with a 0.02 margin, so a model or pipeline change that loses a level, mislabels one or degrades a mask
# fails here.
SHIPPED_DICE = {"T12": 0.915, "L1": 0.873, "L2": 0.932, "L3": 0.932, "L4": 0.922, "L5": 0.874}


@pytest.fixture(scope="module")
def shipped_on_real_ct(tmp_path_factory):
    result, summary = _tool().run(DEFAULT_CFG, out=str(tmp_path_factory.mktemp("real_ct")))
    return real_ct, result, summary


def test_shipped_model_labels_and_segments_the_real_ct(shipped_on_real_ct):
    tool, result, summary = shipped_on_real_ct
    rows = {r["level"]: r for r in summary["rows"] if r["level"]}
    for lv, expected in SHIPPED_DICE.items():
        assert lv in rows, (lv, sorted(rows))
        assert rows[lv]["best_label"] == lv, (lv, rows[lv]["best_label"])  # labelled correctly
        assert rows[lv]["dice"] >= expected - 0.02, (lv, rows[lv]["dice"])
    # no detection outside the labelled bodies (models trained on solid phantom laminae took the real ring-shaped
    # laminae / spinous processes behind the canal for bodies)
    stray = [(r["level"], r["score"]) for r in summary["rows"] if r["best_label"] is None]
    assert stray == []
    # the acceptance: Dice >= 0.85 at every level T12-L5
    assert tool.passes(summary, 0.85) == []


def test_shipped_model_real_ct_hu_plausible(shipped_on_real_ct):
    tool, result, summary = shipped_on_real_ct
    rows = {r["level"]: r for r in summary["rows"] if r["level"] in SHIPPED_DICE}
    # eroded trabecular centre: below TotalSegmentator's eroded-ROI means (131-145 HU, which include the dense shell
    # and endplates) and near its medians (110-129 HU); see docs/real_vs_phantom.md
    for lv, r in rows.items():
        assert 95.0 <= r["trabecular_hu"] <= 140.0, (lv, r["trabecular_hu"])
        assert r["learned_bmd"] is not None and 30.0 <= r["learned_bmd"] <= 250.0, (lv, r["learned_bmd"])
    assert result.patient.get("acr_category") is not None
