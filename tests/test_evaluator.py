"""Evaluation: metric functions on hand-computed examples, and BMDEvaluator on synthetic predictions."""
import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from pycocotools import mask as mask_util

from bmd_d2.evaluation import metrics
from bmd_d2.evaluation.bmd_evaluator import BMDEvaluator, summarize
from bmd_d2.evaluation.build import build_evaluators


def test_regression_metrics_by_hand():
    pred, truth = [110.0, 90.0, 130.0, 70.0], [100.0, 100.0, 120.0, 80.0]  # diffs +10 -10 +10 -10
    assert metrics.mae(pred, truth) == 10.0
    assert metrics.rmse(pred, truth) == 10.0
    assert metrics.bias(pred, truth) == 0.0
    ba = metrics.bland_altman(pred, truth)
    sd = math.sqrt(4 * 100 / 3)  # sample SD of (+10, -10, +10, -10)
    assert ba["sd"] == pytest.approx(sd) and ba["loa_high"] == pytest.approx(1.96 * sd)
    assert ba["loa_low"] == pytest.approx(-1.96 * sd) and ba["n"] == 4
    # diffs (+2, +4): bias 3, rmse sqrt(10), mae 3
    assert metrics.bias([12, 24], [10, 20]) == 3.0 and metrics.rmse([12, 24], [10, 20]) == pytest.approx(math.sqrt(10))
    assert metrics.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (1,2,3,4), y = (1,3,2,4): sxy = 4, sxx = syy = 5 -> r = 0.8
    assert metrics.pearson_r([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(metrics.pearson_r([1], [1])) and math.isnan(metrics.mae([], []))
    with pytest.raises(ValueError):
        metrics.mae([1, 2], [1])


def test_categorical_and_mask_metrics_by_hand():
    assert metrics.accuracy(["a", "b", "b"], ["a", "b", "c"]) == pytest.approx(2 / 3)
    m = metrics.confusion_matrix(["a", "b", "b", "x"], ["a", "b", "a", "a"], ["a", "b"])
    assert m == [[1, 1], [0, 1]]  # rows truth; the "x" prediction is not counted
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[:2, :1] = True  # 2 px inside a
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert metrics.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    iou = metrics.mask_iou_matrix(np.stack([a, b]), np.stack([b, a]))
    assert iou.tolist() == [[0.5, 1.0], [1.0, 0.5]]
    assert metrics.match_greedy(iou, 0.5) == [(1, 0), (0, 1)]
    assert metrics.match_greedy(np.array([[0.4]]), 0.5) == []


def _rle(m):
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _synthetic(n_images=2, H=160, W=96):
    """GT dicts with 5 bodies (L1..L5 at pitch 25 px) + sacrum, and predictions with known BMD errors."""
    dicts, outputs = [], []
    levels = ["L1", "L2", "L3", "L4", "L5", "S1"]
    for k in range(n_images):
        anns, masks = [], []
        for i, lv in enumerate(levels):
            m = np.zeros((H, W), bool)
            y0 = 10 + 25 * i
            m[y0:y0 + (18 if lv != "S1" else 30), 30:60] = True
            masks.append(m)
            anns.append({"bbox": [30, y0, 30, 18], "bbox_mode": 1, "segmentation": _rle(m),
                         "category_id": int(lv == "S1"), "level": lv, "bmd": 100.0 + 10 * i, "iscrowd": 0})
        dicts.append({"image_id": k, "height": H, "width": W, "file_name": f"{k}.png", "annotations": anns})
        inst = Instances((H, W))
        pm = np.stack(masks)
        inst.pred_masks = torch.from_numpy(pm)
        inst.pred_boxes = Boxes(torch.tensor([[30, 10 + 25 * i, 60, 28 + 25 * i] for i in range(6)], dtype=torch.float32))
        inst.scores = torch.tensor([0.9] * 5 + [0.95])
        inst.pred_classes = torch.tensor([0] * 5 + [1])
        # errors +5 on every vertebra of image 0, -5 on image 1
        inst.pred_bmd = torch.tensor([100.0 + 10 * i + (5 if k == 0 else -5) for i in range(6)])
        outputs.append({"instances": inst})
    return dicts, outputs


def _register(dicts, name="bmd_test_synthetic_eval"):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).thing_classes = ["vertebral_body", "sacrum"]
    return name


def test_bmd_evaluator_on_synthetic_predictions(tmp_path):
    dicts, outputs = _synthetic()
    name = _register(dicts)
    ev = BMDEvaluator(name, str(tmp_path), score_threshold=0.5, match_iou=0.5)
    ev.reset()
    for d, o in zip(dicts, outputs):
        ev.process([{"image_id": d["image_id"]}], [o])
    res = ev.evaluate()["bmd"]
    assert res["BMD_mae"] == pytest.approx(5.0) and res["BMD_bias"] == pytest.approx(0.0)
    assert res["BMD_rmse"] == pytest.approx(5.0) and res["BMD_n"] == 10
    sd = np.std([5] * 5 + [-5] * 5, ddof=1)
    assert res["BMD_loa_high"] == pytest.approx(1.96 * sd)
    assert res["Dice"] == pytest.approx(1.0) and res["recall"] == 1.0 and res["precision"] == 1.0
    assert res["level_accuracy"] == 1.0  # sacrum-anchored counting names L1..L5, S1 correctly
    # ACR: true 100..140 (osteopenia x3: 100,110,120; normal: 130,140); +5 moves 120 -> 125 (normal): 1 error;
    # -5 moves 130 -> 125 (still normal), 100 -> 95 (osteopenia): 0 errors -> 9/10
    assert res["ACR_accuracy"] == pytest.approx(0.9)
    data = json.loads((tmp_path / "bmd_metrics.json").read_text())
    assert data["acr_confusion"]["matrix_rows_truth"] == [[4, 0, 0], [1, 5, 0], [0, 0, 0]]  # rows truth: normal, osteopenia, osteoporosis
    assert set(data["per_level"]) == {"L1", "L2", "L3", "L4", "L5", "S1"}
    for png in ("bmd_bland_altman.png", "bmd_scatter.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluator_missed_and_false_detections():
    dicts, outputs = _synthetic(1)
    inst = outputs[0]["instances"]
    keep = torch.tensor([True, True, False, True, True, True])  # L3 missed
    inst = inst[keep]
    inst.scores[0] = 0.2  # L1 below threshold -> not used
    ev = BMDEvaluator("unused", None)
    rec = ev.image_record(dicts[0], inst)
    s = summarize([rec])
    assert s["gt_instances"] == 6 and s["predictions"] == 4 and s["matched"] == 4
    assert s["recall"] == pytest.approx(4 / 6) and s["precision"] == 1.0
    # with L1 and L3 gone the count from the sacrum still names L5, L4; the gap at L3 is skipped
    assert {p["gt_level"]: p["pred_level"] for p in rec["pairs"]} == {"L2": "L2", "L4": "L4", "L5": "L5", "S1": "S1"}


def test_build_evaluators_includes_bmd(tmp_path):
    from bmd_d2.config import get_bmd_cfg

    cfg = get_bmd_cfg("configs/quick_schedules/bmd_rcnn_MFEFPN_instant_test.yaml")
    evs = build_evaluators(cfg, _register(_synthetic()[0]), str(tmp_path))
    assert any(isinstance(e, BMDEvaluator) for e in evs._evaluators)
