"""ROI fusion, MultiScaleFusionMaskHead, erosion/truncation and BMDHead (train and eval)."""
import numpy as np
import pytest
import torch

from _model_fixtures import RECTS, synthetic_sample, tiny_cfg
from bmd_d2.modeling import MultiLevelROIPooler, MultiScaleFusionMaskHead, stacked_erosion, truncate_mask
from detectron2.engine import DefaultPredictor
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "loss_bmd"}


# ---------------------------------------------------------------- erosion / truncation
@pytest.mark.parametrize("k", [1, 3])
def test_erosion_removes_k_pixels_of_border(k):
    m = torch.zeros(2, 56, 56)
    m[0, 10:30, 20:40] = 1  # 20x20 square inside the grid
    m[1, 0:20, 0:20] = 1  # square touching the grid edge: outside the ROI counts as background
    e = stacked_erosion(m, k)
    exp = torch.zeros_like(m)
    exp[0, 10 + k:30 - k, 20 + k:40 - k] = 1
    exp[1, k:20 - k, k:20 - k] = 1
    assert torch.equal(e, exp)


def test_erosion_empties_objects_thinner_than_2k_plus_1():
    k = 3
    m = torch.zeros(2, 56, 56)
    m[0, 10:40, 20:20 + 2 * k] = 1  # 6 px wide: vanishes (documented behaviour)
    m[1, 10:40, 20:20 + 2 * k + 1] = 1  # 7 px wide: a 1-px line survives
    e = stacked_erosion(m, k)
    assert e[0].sum() == 0
    assert e[1].sum() == 30 - 2 * k and e[1, 10 + k:40 - k, 20 + k].all()
    assert stacked_erosion(m, 0).equal(m)


def test_truncation_blocks_gradient():
    p = torch.rand(3, 8, 8, requires_grad=True)
    b = truncate_mask(p, 0.5)
    assert not b.requires_grad and set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b, (p > 0.5).float())
    assert not stacked_erosion(b, 2).requires_grad


# ---------------------------------------------------------------- fusion shapes
def _boxes():
    return [Boxes(torch.tensor([[8.0, 8.0, 40.0, 50.0], [60.0, 20.0, 120.0, 64.0]])), Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0]]))]


def _features(c=32, size=128):
    return [torch.randn(2, c, size // 2 ** i, size // 2 ** i) for i in range(2, 7)]


def test_box_fusion_sums_all_levels_at_7x7():
    feats, boxes = _features(), _boxes()
    scales = [1.0 / 2 ** i for i in range(2, 7)]
    fused = MultiLevelROIPooler(output_sizes=[7] * 5, scales=scales, sampling_ratio=2, fuse="sum")(feats, boxes)
    per = MultiLevelROIPooler(output_sizes=[7] * 5, scales=scales, sampling_ratio=2)(feats, boxes)
    assert fused.shape == (3, 32, 7, 7)
    assert len(per) == 5 and all(p.shape == (3, 32, 7, 7) for p in per)
    assert torch.allclose(fused, sum(per), atol=1e-5)
    assert all(p.abs().sum() > 0 for p in per)  # every box is pooled on every level


def test_mask_fusion_gives_56x56_and_logits():
    feats, boxes = _features(), _boxes()
    sizes = [56, 56, 28, 28, 14]
    pooled = MultiLevelROIPooler(output_sizes=sizes, scales=[1.0 / 2 ** i for i in range(2, 7)], sampling_ratio=2)(
        feats, boxes)
    assert [p.shape[-1] for p in pooled] == sizes
    head = MultiScaleFusionMaskHead([ShapeSpec(channels=32, height=s, width=s) for s in sizes], num_classes=2,
                                    conv_dim=32, conv_norm="GN", upsample_factor=2)
    fused = head.fuse(pooled)
    assert fused.shape == (3, 32, 56, 56)
    assert head.predict(fused).shape == (3, 2, 112, 112) == head.layers(pooled).shape


# ---------------------------------------------------------------- BMDHead in the full model
def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**overrides))
    model.train()
    return model


@pytest.mark.parametrize("source", ["pred", "gt"])
def test_training_losses_both_mask_sources(source):
    model = _model(**{"MODEL.ROI_BMD_HEAD.MASK_SOURCE": source})
    assert model.roi_heads.bmd_mask_source == source
    with EventStorage(0):
        losses = model([synthetic_sample(), synthetic_sample()])
    assert set(losses) == LOSS_KEYS
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), (k, v)
    assert losses["loss_bmd"].requires_grad


@pytest.mark.parametrize("source", ["pred", "gt"])
def test_loss_bmd_reaches_estimator_not_truncation(source):
    model = _model(**{"MODEL.ROI_BMD_HEAD.MASK_SOURCE": source})
    with EventStorage(0):
        losses = model([synthetic_sample()])
    losses["loss_bmd"].backward()
    heads = model.roi_heads
    for name, p in heads.bmd_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the mask logits (conv module after the fusion) get nothing from loss_bmd: truncation stops the gradient
    for p in list(heads.mask_head.mask_conv.parameters()) + list(heads.mask_head.predictor.parameters()):
        assert p.grad is None
    # ...while the fused features (and so the backbone) do
    assert heads.mask_head.fuse_convs[0].weight.grad is not None
    assert model.backbone.p5.weight.grad is not None


def test_zero_loss_bmd_without_foreground():
    model = _model(**{"MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": False})
    sample = synthetic_sample()
    images = model.preprocess_image([sample])
    features = model.backbone(images.tensor)
    prop = Instances((128, 128))
    prop.proposal_boxes = Boxes(torch.tensor([[100.0, 0.0, 127.0, 10.0], [0.0, 115.0, 12.0, 127.0]]))
    prop.objectness_logits = torch.zeros(2)
    with EventStorage(0):
        _, losses = model.roi_heads(images, features, [prop], [sample["instances"]])
    assert float(losses["loss_bmd"].detach()) == 0.0 and losses["loss_bmd"].requires_grad
    assert float(losses["loss_mask"].detach()) == 0.0
    losses["loss_bmd"].backward()  # graph-connected


def test_missing_gt_bmd_is_an_error():
    model = _model()
    sample = synthetic_sample()
    sample["instances"].remove("gt_bmd")
    with EventStorage(0), pytest.raises(KeyError, match="gt_bmd"):
        model([sample])


def test_bmd_off_has_no_bmd_outputs():
    model = _model(**{"MODEL.BMD_ON": False})
    with EventStorage(0):
        losses = model([synthetic_sample()])
    assert set(losses) == LOSS_KEYS - {"loss_bmd"}
    model.eval()
    with torch.no_grad():
        out = model([synthetic_sample()])[0]["instances"]
    assert not out.has("pred_bmd")


def test_default_predictor_outputs_pred_bmd():
    cfg = tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    img = synthetic_sample()["image"].permute(1, 2, 0).numpy().astype(np.uint8)  # (H, W, 3) uint8
    inst = predictor(img)["instances"]
    r = len(inst)
    assert r > 0
    assert inst.pred_boxes.tensor.shape == (r, 4)
    assert inst.pred_masks.shape == (r, 128, 128)
    assert inst.pred_bmd.shape == (r,) and inst.pred_bmd.dtype == torch.float32
    assert torch.isfinite(inst.pred_bmd).all()


def test_eval_without_detections():
    cfg = tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 1.0})
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        inst = model([synthetic_sample()])[0]["instances"]
    assert len(inst) == 0 and inst.pred_bmd.shape == (0,)


def test_intensity_input_reads_the_eroded_roi_of_the_image():
    from bmd_d2.modeling import BMDErosionEstimator

    # ROI means per channel and the mask's share: a 4x4 image ROI, mask on its left half
    rois = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4)
    mask[:, :, :2] = 1.0
    mask[1] = 0.0  # an empty mask gives zero means, share 0
    out = BMDErosionEstimator.roi_intensity(rois, mask)
    assert out.shape == (2, 4)
    assert torch.allclose(out[0, :3], rois[0][:, :, :2].mean(dim=(1, 2))) and float(out[0, 3]) == 0.5
    assert torch.all(out[1] == 0)


def test_intensity_input_trains_and_predicts_through_the_roi_heads():
    on = {"MODEL.ROI_BMD_HEAD.INTENSITY_INPUT": True, "MODEL.ROI_BMD_HEAD.MASK_SOURCE": "gt"}
    model = _model(**on)
    head = model.roi_heads.bmd_head
    assert head.needs_image_rois
    plain = _model()
    # the FC input grows by the image's 3 channel means and the mask share
    assert head.fcs[0].in_features == plain.roi_heads.bmd_head.fcs[0].in_features + 4
    with EventStorage(0):
        losses = model([synthetic_sample()])
    losses["loss_bmd"].backward()
    assert head.fcs[0].weight.grad[:, -4:].abs().sum() > 0  # the intensity inputs reach the loss
    assert model.roi_heads._images is None  # not kept after the call
    model.eval()
    with torch.no_grad():
        inst = model([synthetic_sample()])[0]["instances"]
    assert inst.pred_bmd.shape == (len(inst),) and torch.isfinite(inst.pred_bmd).all()
    # the ROI heads called without the images (forward_with_given_boxes alone) cannot feed it: a clear error
    sample = synthetic_sample()
    images = model.preprocess_image([sample])
    with torch.no_grad():
        features = model.backbone(images.tensor)
        given = Instances((128, 128), pred_boxes=Boxes(torch.tensor([[16.0, 12.0, 56.0, 44.0]])),
                          pred_classes=torch.tensor([0]), scores=torch.tensor([1.0]))
        with pytest.raises(ValueError, match="INTENSITY_INPUT needs the input image"):
            model.roi_heads.forward_with_given_boxes(features, [given])
    # and the estimator called without image ROIs says what it needs
    with pytest.raises(ValueError, match="needs the image ROIs"):
        head(torch.zeros(1, head.in_channels, head.size, head.size), torch.ones(1, head.size, head.size),
             [Instances((128, 128), pred_boxes=Boxes(torch.zeros(1, 4)))])


def test_image_rois_are_the_normalised_image_in_each_box():
    model = _model(**{"MODEL.ROI_BMD_HEAD.INTENSITY_INPUT": True})
    sample = synthetic_sample()
    images = model.preprocess_image([sample])
    mean, std = model.pixel_mean.view(-1)[0].item(), model.pixel_std.view(-1)[0].item()
    boxes = Boxes(torch.tensor([r[:4] for r in RECTS], dtype=torch.float32))
    model.roi_heads._images = images
    try:
        rois = model.roi_heads._image_rois([boxes], 56)
    finally:
        model.roi_heads._images = None
    assert rois.shape == (len(RECTS), 3, 56, 56)
    for roi, rect in zip(rois, RECTS):  # inside each box its rectangle's grey value (the edge samples blend)
        inner = roi[:, 4:-4, 4:-4]
        assert torch.allclose(inner, torch.full_like(inner, (rect[6] - mean) / std), atol=1e-4)
        assert float(roi.min()) < (rect[6] - mean) / std  # the edge samples see the dark background
