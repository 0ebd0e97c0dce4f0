"""ROI fusion, MultiScaleFusionMaskHead, erosion/truncation and BMDHead (train and eval)."""
import numpy as np
import pytest
import torch

from _model_fixtures import synthetic_sample, tiny_cfg
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
