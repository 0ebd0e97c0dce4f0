"""Test-time shifts and sizes (MEASURE.TTA_SHIFTS, MEASURE.TTA_SIZES; bmd_d2.modeling.test_time_augmentation): image
shifting, pass merging, config validation, and the wrapper's passes against DefaultPredictor on the shipped model."""
import os

import numpy as np
import pytest

from bmd_d2.config import get_bmd_cfg
from bmd_d2.errors import BMDError
from bmd_d2.modeling.test_time_augmentation import (instances_to_arrays, merge_tta_passes, parse_tta_shifts,
                                                    parse_tta_sizes, shift_image, unshift_pass)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shift_image_moves_content_and_fills_zeros():
    img = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    s = shift_image(img, 1, -2)
    np.testing.assert_array_equal(s, [[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0]])
    np.testing.assert_array_equal(shift_image(img, 0, 0), img)
    assert not shift_image(img, 3, 0).any() and not shift_image(img, 0, -4).any()
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    back = shift_image(shift_image(rgb, -1, 2), 1, -2)
    np.testing.assert_array_equal(back[1:, :4], rgb[1:, :4])  # the kept part returns unchanged
    assert not back[0].any() and not back[:, 4:].any()


def test_unshift_pass_maps_boxes_and_masks_back():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 3:5, 4:7] = 0.9
    dets = dict(boxes=np.array([[4.0, 3.0, 7.0, 5.0]]), scores=np.ones(1), classes=np.zeros(1, int), masks=m,
                bmd=np.array([100.0]))
    back = unshift_pass(dets, 1, 2)
    np.testing.assert_allclose(back["boxes"], [[2.0, 2.0, 5.0, 4.0]])
    assert back["masks"][0, 2:4, 2:5].min() == pytest.approx(0.9) and back["masks"].sum() == pytest.approx(0.9 * 6)
    assert dets["boxes"][0, 0] == 4.0  # input untouched


def _det(boxes, scores, classes, masks, bmd):
    return dict(boxes=np.array(boxes, float), scores=np.array(scores, float), classes=np.array(classes, int),
                masks=np.array(masks, np.float32), bmd=np.array(bmd, float))


def test_merge_matches_by_box_and_class_and_averages():
    H = W = 10
    a = np.zeros((H, W), np.float32)
    a[1:4, 1:4] = 0.8
    b = np.zeros((H, W), np.float32)
    b[6:9, 6:9] = 0.6
    ref = _det([[1, 1, 4, 4], [6, 6, 9, 9]], [0.9, 0.8], [0, 1], [a, b], [100, 200])
    # second pass: same objects in the other order, the first one's mask only half as sure, plus an extra detection
    a2 = a * 0.5
    extra = np.ones((H, W), np.float32)
    p2 = _det([[6, 6, 9, 9], [1, 1, 4, 4], [0, 0, 10, 10]], [0.6, 0.7, 0.99], [1, 0, 0], [b, a2, extra],
              [220, 110, 500])
    # third pass: the sacrum-class object comes back as a vertebral body (class differs: not matched), object 1 moved
    a3 = np.zeros((H, W), np.float32)
    a3[2:5, 1:4] = 0.8
    p3 = _det([[1, 2, 4, 5], [6, 6, 9, 9]], [0.5, 0.95], [0, 0], [a3, b], [130, 999])
    out = merge_tta_passes([ref, p2, p3])
    assert len(out["scores"]) == 2  # the reference's detections only
    np.testing.assert_array_equal(out["classes"], [0, 1])
    np.testing.assert_allclose(out["scores"], [(0.9 + 0.7 + 0.5) / 3, (0.8 + 0.6 + 0.0) / 3])
    np.testing.assert_allclose(out["bmd"], [(100 + 110 + 130) / 3, (200 + 220) / 2])
    np.testing.assert_allclose(out["boxes"][0], [1, 4 / 3, 4, 13 / 3])
    np.testing.assert_allclose(out["boxes"][1], [6, 6, 9, 9])
    # object 0: mean probability (0.8 + 0.4 + 0.8) / 3 ≥ 0.5 on rows 2-3, (0.8 + 0.4 + 0) / 3 < 0.5 on row 1,
    # (0 + 0 + 0.8) / 3 on row 4
    assert out["masks"].dtype == bool
    np.testing.assert_array_equal(np.nonzero(out["masks"][0].any(1))[0], [2, 3])
    assert out["masks"][1].sum() == 9  # 0.6 in both matched passes


def test_merge_of_one_pass_thresholds_its_masks():
    m = np.array([[0.2, 0.5, 0.7]], np.float32)
    ref = _det([[0, 0, 3, 1]], [0.9], [0], [m], [50])
    out = merge_tta_passes([ref])
    np.testing.assert_array_equal(out["masks"][0], [[False, True, True]])
    assert out["scores"][0] == pytest.approx(0.9) and out["bmd"][0] == pytest.approx(50)
    empty = _det(np.zeros((0, 4)), [], [], np.zeros((0, 1, 3)), [])
    out = merge_tta_passes([empty, ref])
    assert out["masks"].shape == (0, 1, 3) and len(out["scores"]) == 0


def test_parse_tta_shifts_and_config_errors():
    assert parse_tta_shifts([]) == []
    assert parse_tta_shifts([[0, 0], [0, 1], [1, 1], [0, 1]]) == [(0, 1), (1, 1)]
    for bad in ([[0.5, 1]], [[1, 2, 3]], [1, 2], [[9, 0]], [[True, 0]]):
        with pytest.raises(BMDError, match=r"MEASURE\.TTA_SHIFTS must be a list of \[dy, dx\]"):
            parse_tta_shifts(bad)
    cfg = get_bmd_cfg("", ["MEASURE.TTA_SHIFTS", "[[0, 1], [1, 0]]"])
    assert parse_tta_shifts(cfg.MEASURE.TTA_SHIFTS) == [(0, 1), (1, 0)]


def test_merge_skips_the_bmd_of_passes_without_one():
    m = np.zeros((4, 4), np.float32)
    m[1:3, 1:3] = 0.9
    ref = _det([[1, 1, 3, 3]], [0.9], [0], [m], [100])
    same_size = _det([[1, 1, 3, 3]], [0.8], [0], [m], [120])
    other_size = dict(_det([[1, 1, 3, 3]], [0.7], [0], [m * 0.1], [0]), bmd=None)
    out = merge_tta_passes([ref, same_size, other_size])
    assert out["bmd"][0] == pytest.approx(110)  # (100 + 120) / 2: the pass without BMD is not counted
    assert out["scores"][0] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    # but its mask is: (0.9 + 0.9 + 0.09) / 3 = 0.63
    assert out["masks"][0].sum() == 4


def test_parse_tta_sizes_and_config_errors():
    assert parse_tta_sizes([], 256) == []
    assert parse_tta_sizes([240, 256, 272, 240], 256) == [240, 272]  # the base size is the reference pass already
    for bad in ([27], [272.0], ["272"], [True], [5000]):
        with pytest.raises(BMDError, match=r"MEASURE\.TTA_SIZES must be a list of integer image sizes"):
            parse_tta_sizes(bad, 256)
    cfg = get_bmd_cfg("", ["MEASURE.TTA_SIZES", "[240, 272]"])
    assert parse_tta_sizes(cfg.MEASURE.TTA_SIZES, cfg.INPUT.MIN_SIZE_TEST) == [240, 272]


@pytest.fixture(scope="module")
def shipped_predictor_and_image():
    from bmd_d2.data.dicom import load_nifti
    from bmd_d2.measure import BMDStudyPredictor

    cfg = get_bmd_cfg(os.path.join(ROOT, "configs", "bmd_default.yaml"),
                      ["MEASURE.TTA_SHIFTS", "[[0, 1], [1, 0], [1, 1]]"])
    pred = BMDStudyPredictor(cfg)
    vol = load_nifti(os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct", "example_ct.nii.gz"))
    sag = pred.sagittal(vol)
    return pred, sag


def _learned_key(pred):
    """The learned value's key: "bmd" (mg/cm3), "hu" (a head with ROI_BMD_HEAD.TARGET "hu") or "hu_correction" (TARGET
    "hu_correction": the shipped model)."""
    return {"hu": "hu", "hu_correction": "hu_correction"}.get(pred.cfg.MODEL.ROI_BMD_HEAD.TARGET, "bmd")


def test_soft_pass_equals_default_predictor(shipped_predictor_and_image):
    """The wrapper's test-time resize is DefaultPredictor's and its soft pass keeps detector_postprocess's geometry:
    same detections, and its probabilities thresholded at 0.5 give exactly Detectron2's masks."""
    from detectron2.engine import DefaultPredictor

    pred, sag = shipped_predictor_and_image
    image = pred.model_image(sag)
    bare = pred.cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""
    default = DefaultPredictor(bare)
    default.model = pred.model
    # DefaultPredictor takes BGR and reverses it for an "RGB" model: hand it the reverse of the model's image
    ref = instances_to_arrays(default(image[:, :, ::-1] if pred.cfg.INPUT.FORMAT == "RGB" else image)["instances"])
    single = instances_to_arrays(pred.tta.predict(image))
    learned = _learned_key(pred)
    assert ref[learned] is not None and len(ref[learned]) == len(ref["scores"])
    for k in ("boxes", "scores", "classes", "masks", learned):
        np.testing.assert_array_equal(single[k], ref[k])
    soft = pred.tta.soft_pass(image)
    assert len(ref["scores"]) >= 6
    np.testing.assert_allclose(soft["boxes"], ref["boxes"], atol=1e-3)
    np.testing.assert_allclose(soft["scores"], ref["scores"], atol=1e-6)
    np.testing.assert_array_equal(soft["classes"], ref["classes"])
    np.testing.assert_allclose(soft[learned], ref[learned], atol=1e-3)
    assert soft["masks"].dtype == np.float32 and 0.0 <= soft["masks"].min() and soft["masks"].max() <= 1.0
    differ = np.count_nonzero((soft["masks"] >= 0.5) != ref["masks"])
    assert differ == 0, differ


def test_detect_with_shifts_keeps_the_reference_detections(shipped_predictor_and_image):
    pred, sag = shipped_predictor_and_image
    merged = pred.detect(sag)
    shifts, pred.tta.shifts = pred.tta.shifts, []
    try:
        single = pred.detect(sag)
    finally:
        pred.tta.shifts = shifts
    np.testing.assert_array_equal(merged["classes"], single["classes"])
    assert merged["masks"].dtype == bool and merged["masks"].shape == single["masks"].shape
    # vertebrae found in every pass keep their score; their merged masks stay close to the single pass's
    for i in range(len(single["scores"])):
        if single["scores"][i] > 0.9:
            inter = np.logical_and(merged["masks"][i], single["masks"][i]).sum()
            dice = 2 * inter / (merged["masks"][i].sum() + single["masks"][i].sum())
            assert dice > 0.9, (i, dice)
            assert abs(merged["scores"][i] - single["scores"][i]) < 0.1
    np.testing.assert_allclose(merged["boxes"], single["boxes"], atol=3.0)


def test_soft_pass_at_another_size(shipped_predictor_and_image):
    """A pass at another input size reports in the image's own frame: at the base size it is the plain soft pass;
    at 272 px the same vertebrae come back at (nearly) the same place."""
    pred, sag = shipped_predictor_and_image
    image = pred.model_image(sag)
    base = pred.tta.soft_pass(image)
    same = pred.tta.soft_pass(image, int(pred.cfg.INPUT.MIN_SIZE_TEST))
    np.testing.assert_allclose(same["boxes"], base["boxes"], atol=1e-4)
    np.testing.assert_array_equal(same["masks"], base["masks"])
    big = pred.tta.soft_pass(image, 272)
    assert big["masks"].shape == (len(big["scores"]),) + image.shape[:2]
    confident = np.nonzero(base["scores"] > 0.9)[0]
    assert len(confident) >= 5
    for i in confident:
        d = np.abs(big["boxes"] - base["boxes"][i]).max(1)
        j = int(np.argmin(d))
        assert d[j] < 6.0 and big["classes"][j] == base["classes"][i], (i, d[j])
        a, b = base["masks"][i] >= 0.5, big["masks"][j] >= 0.5
        assert 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) > 0.85


def test_detect_with_sizes_keeps_the_reference_detections_and_bmd(shipped_predictor_and_image):
    pred, sag = shipped_predictor_and_image
    shifts, sizes = pred.tta.shifts, pred.tta.sizes
    try:
        pred.tta.shifts, pred.tta.sizes = [], []
        single = pred.detect(sag)
        pred.tta.sizes = [240, 272]
        merged = pred.detect(sag)
    finally:
        pred.tta.shifts, pred.tta.sizes = shifts, sizes
    np.testing.assert_array_equal(merged["classes"], single["classes"])
    # the learned BMD comes from the passes at the training size only: here the reference pass alone
    learned = _learned_key(pred)
    assert single[learned] is not None
    np.testing.assert_allclose(merged[learned], single[learned], atol=1e-4)
    np.testing.assert_allclose(merged["boxes"], single["boxes"], atol=4.0)
    changed = [np.count_nonzero(merged["masks"][i] != single["masks"][i]) for i in range(len(single["scores"]))]
    assert max(changed) > 0  # the other sizes do move the mask outlines


def test_box_iou_equals_detectron2_pairwise_iou():
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    from bmd_d2.utils.matching import box_iou

    rng = np.random.default_rng(3)
    a = rng.uniform(0, 50, (7, 2))
    b = rng.uniform(0, 50, (9, 2))
    a = np.c_[a, a + rng.uniform(0, 30, (7, 2))]
    b = np.c_[b, b + rng.uniform(0, 30, (9, 2))]
    b[0] = a[0]  # identical boxes
    b[1] = [200, 200, 210, 210]  # disjoint from everything
    b[2] = [a[1, 0], a[1, 1], a[1, 0], a[1, 3]]  # zero width
    ref = pairwise_iou(Boxes(torch.as_tensor(a)), Boxes(torch.as_tensor(b))).numpy()
    np.testing.assert_array_equal(box_iou(a, b), ref)  # bit for bit: merging takes IoU ties in the same order
    assert box_iou(a, np.zeros((0, 4))).shape == (7, 0)


def test_detectron2_public_pasting_keeps_no_probabilities(shipped_predictor_and_image):
    """Why the soft pass pastes the probabilities itself: detector_postprocess(mask_threshold=-1) returns bool masks
    (p >= 1/255) and paste_masks_in_image(threshold=-1) uint8 floor(255 p); its 0.5 threshold is ours exactly."""
    import torch
    from detectron2.layers import paste_masks_in_image
    from detectron2.modeling.postprocessing import detector_postprocess

    from bmd_d2.modeling.test_time_augmentation import paste_soft_masks

    pred, sag = shipped_predictor_and_image
    image = pred.model_image(sag)
    H, W = image.shape[:2]
    raw = pred.tta.inference(image)
    masks = raw.pred_masks[:, 0].float().clone()
    post = detector_postprocess(raw, H, W, mask_threshold=-1)
    assert len(post) == len(masks) >= 6
    soft = paste_soft_masks(masks, post.pred_boxes.tensor, H, W)
    assert post.pred_masks.dtype == torch.bool
    np.testing.assert_array_equal(post.pred_masks.numpy(), (soft * 255).astype(np.uint8) > 0)
    u8 = paste_masks_in_image(masks, post.pred_boxes, (H, W), threshold=-1).numpy()
    np.testing.assert_array_equal(u8, (soft * 255).astype(np.uint8))
    np.testing.assert_array_equal(paste_masks_in_image(masks, post.pred_boxes, (H, W), threshold=0.5).numpy(),
                                  soft >= 0.5)


def test_predictor_reads_weights_and_calibration_once(tmp_path, monkeypatch):
    import json

    import torch

    import bmd_d2.checkpoint as checkpoint
    from bmd_d2.data.dicom import load_nifti
    from bmd_d2.measure import BMDStudyPredictor, classical

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"slope": 1.1, "intercept": 2.0}))
    calls = {"torch.load": 0, "calibration": 0}
    real_load, real_cal = torch.load, classical.load_calibration_file

    def counting_load(*args, **kwargs):
        calls["torch.load"] += 1
        return real_load(*args, **kwargs)

    def counting_cal(path):
        calls["calibration"] += 1
        return real_cal(path)

    monkeypatch.setattr(checkpoint.torch, "load", counting_load)
    monkeypatch.setattr(classical, "load_calibration_file", counting_cal)
    cfg = get_bmd_cfg(os.path.join(ROOT, "configs", "bmd_default.yaml"),
                      ["MEASURE.CALIBRATION_FILE", str(cal), "MEASURE.TTA_SHIFTS", "[]", "MEASURE.TTA_SIZES", "[]",
                       "MEASURE.INTERNAL_REFERENCE", "True"])
    pred = BMDStudyPredictor(cfg)
    assert calls == {"torch.load": 1, "calibration": 1}
    vol = load_nifti(os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct", "example_ct.nii.gz"))
    first, second = pred(vol, study_id="a"), pred(vol, study_id="b")
    assert calls == {"torch.load": 1, "calibration": 1}
    assert first.calibration == second.calibration and first.calibration["source"].startswith("file:cal.json")
    assert pred.calibration.source == "file:cal.json" and pred.calibration.hu_gain == 1.0  # per-study copy corrected


def test_batched_passes_equal_one_pass_at_a_time(shipped_predictor_and_image):
    """The reference and the shifted passes run as one batch (one model call): the same detections as running
    each pass alone, and the merged result as merging the one-at-a-time passes."""
    from bmd_d2.modeling.test_time_augmentation import LEARNED_KEYS, merge_tta_passes, shift_image, unshift_pass

    pred, sag = shipped_predictor_and_image
    image = pred.model_image(sag)
    tta = pred.tta
    learned = _learned_key(pred)
    assert len(tta.shifts) == 3
    images = [image] + [shift_image(image, dy, dx) for dy, dx in tta.shifts]
    batched = tta.inference_batch(images)
    assert len(batched) == 4
    for img, inst in zip(images, batched):
        alone = tta.inference(img)
        assert len(alone) == len(inst) >= 6
        np.testing.assert_array_equal(inst.pred_classes.numpy(), alone.pred_classes.numpy())
        np.testing.assert_allclose(inst.pred_boxes.tensor.numpy(), alone.pred_boxes.tensor.numpy(), atol=1e-4)
        np.testing.assert_allclose(inst.scores.numpy(), alone.scores.numpy(), atol=1e-6)
        np.testing.assert_allclose(inst.pred_masks.numpy(), alone.pred_masks.numpy(), atol=1e-5)
        np.testing.assert_allclose(instances_to_arrays(inst)[learned], instances_to_arrays(alone)[learned], rtol=1e-5,
                                   atol=1e-3)
    one_by_one = [tta.soft_pass(image)] + [unshift_pass(tta.soft_pass(shift_image(image, dy, dx)), dy, dx)
                                           for dy, dx in tta.shifts]
    one_by_one += [dict(tta.soft_pass(image, s), **dict.fromkeys(LEARNED_KEYS)) for s in tta.sizes]
    ref, got = merge_tta_passes(one_by_one), tta(image)
    np.testing.assert_array_equal(got["classes"], ref["classes"])
    np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1e-4)
    assert got[learned] is not None
    np.testing.assert_allclose(got[learned], ref[learned], rtol=1e-5)
    assert np.count_nonzero(got["masks"] != ref["masks"]) <= 2  # a probability at exactly 0.5 may round either way
