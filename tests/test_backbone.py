"""MFEFPN: output keys, strides and channels match ``output_shape()`` for every variant."""
import pytest
import torch

from _model_fixtures import tiny_cfg
from bmd_d2.modeling import MFEFPN, build_mfe_fpn_backbone
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone


def _check(backbone, size=128):
    x = torch.randn(2, 3, size, size)
    out = backbone(x)
    shapes = backbone.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] == list(shapes)
    for name, t in out.items():
        s = shapes[name]
        assert s.stride == 2 ** int(name[1:])
        assert t.shape == (2, s.channels, size // s.stride, size // s.stride), (name, tuple(t.shape))
        assert torch.isfinite(t).all()
    assert backbone.size_divisibility == 64


@pytest.mark.parametrize("downsample", ["pool", "conv"])
@pytest.mark.parametrize("fuse", ["cat", "add"])
@pytest.mark.parametrize("dense", [True, False])
def test_mfefpn_variants(downsample, fuse, dense):
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.MFEFPN.DOWNSAMPLE": downsample, "MODEL.MFEFPN.FUSE_TYPE": fuse,
                      "MODEL.MFEFPN.DENSE_TOP_DOWN": dense})
    backbone = build_mfe_fpn_backbone(cfg, ShapeSpec(channels=3))
    _check(backbone)
    mfe2 = backbone.mfe[0]
    assert mfe2.out_channels == (3 * 64 if fuse == "cat" else 64)  # R18: C2 has 64 channels
    assert isinstance(mfe2.down, torch.nn.MaxPool2d) == (downsample == "pool")
    assert backbone.top_down[0].in_channels == (3 if dense else 2) * 32


def test_registry_names_and_p6_conv():
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "MFEFPN", "MODEL.MFEFPN.P6_DOWNSAMPLE": "conv"})
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MFEFPN)
    _check(backbone, size=64)
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "build_mfe_fpn_backbone"})
    assert isinstance(build_backbone(cfg), MFEFPN)


def test_gradient_reaches_c1_path():
    """C1 (stem conv, captured by a hook) feeds MFE(2): its transition conv gets gradient."""
    backbone = build_mfe_fpn_backbone(tiny_cfg(), ShapeSpec(channels=3))
    out = backbone(torch.randn(1, 3, 64, 64))
    out["p2"].sum().backward()
    assert backbone.mfe[0].transition.weight.grad is not None
    assert backbone.mfe[0].transition.weight.grad.abs().sum() > 0


def test_rejects_unpadded_input():
    backbone = build_mfe_fpn_backbone(tiny_cfg(), ShapeSpec(channels=3))
    with pytest.raises(AssertionError, match="size_divisibility"):
        backbone(torch.randn(1, 3, 96, 96))
