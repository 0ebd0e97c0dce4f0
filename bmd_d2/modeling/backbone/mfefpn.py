"""``MFEFPN``: ResNet bottom-up + multi-scale feature enhancement (MFE) + dense top-down pyramid.

Bottom-up: Detectron2's ResNet (``build_resnet_backbone``; depth, norm, widths from ``MODEL.RESNETS``). Besides
``res2..res5`` (C2..C5, strides 4..32) the module uses C1 = ReLU(output of the stem's first 7×7 stride-2 conv),
stride 2, read through a forward hook on ``stem.conv1`` so the ResNet runs unchanged.

MFE(i), i = 2, 3, 4 (stride 2**i, channels of C(i) = ``c_i``)::

    t = down2(relu(norm(1x1(C(i-1)))))          # transition to c_i channels; "pool": 2x2 max pool, "conv": 3x3 s2
    u = up2(relu(norm(1x1(C(i+1)))))            # compress to c_i channels, nearest 2x upsampling
    MFE(i) = cat[t, C(i), u]  (3 c_i channels)  or  t + C(i) + u  (c_i channels)

Top-down (all maps ``out_channels``)::

    P5 = norm(1x1(C5));  P6 = down2(P5)         # "pool": stride-2 subsampling, "conv": 3x3 stride-2 conv
    P(i) = norm(1x1(cat[norm(1x1(MFE(i))), up2(P(i+1)), up4(P(i+2))]))   i = 4, 3, 2 (dense)
    P(i) = norm(1x1(cat[norm(1x1(MFE(i))), up2(P(i+1))]))                 (DENSE_TOP_DOWN: False)

``size_divisibility`` is 64 (the stride of P6), so every up-/down-sampling is exact and no resize "to fit" is needed.
"""
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["MFEModule", "MFEFPN", "build_mfe_fpn_backbone"]

_C1 = "c1"


def _conv(in_ch: int, out_ch: int, *, kernel_size: int = 1, stride: int = 1, norm: str = "",
          relu: bool = False) -> Conv2d:
    """A Detectron2 ``Conv2d`` (+ optional norm, ReLU) with MSRA init; padding keeps size (up to stride)."""
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=nn.ReLU() if relu else None,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by an integer factor. ``(N, C, H, W)`` → ``(N, C, fH, fW)``."""
    return F.interpolate(x, scale_factor=float(factor), mode="nearest")


class MFEModule(nn.Module):
    """Multi-scale feature enhancement of level i from C(i-1), C(i), C(i+1).

    Args:
        lower_channels: channels of C(i-1) (stride s/2).
        channels: channels of C(i) (stride s); both neighbours are projected to it.
        upper_channels: channels of C(i+1) (stride 2s).
        fuse_type: ``"cat"`` (output ``3 * channels``) or ``"add"`` (output ``channels``).
        downsample: ``"pool"`` (2×2 max pool) or ``"conv"`` (3×3 stride-2 conv) for C(i-1).
        norm: Detectron2 norm name for the projections ("" = none).
    """

    def __init__(self, *, lower_channels: int, channels: int, upper_channels: int, fuse_type: str,
                 downsample: str, norm: str = ""):
        super().__init__()
        if fuse_type not in ("cat", "add"):
            raise ValueError(f"MODEL.MFEFPN.FUSE_TYPE must be 'cat' or 'add', got {fuse_type!r}")
        if downsample not in ("pool", "conv"):
            raise ValueError(f"MODEL.MFEFPN.DOWNSAMPLE must be 'pool' or 'conv', got {downsample!r}")
        self.fuse_type = fuse_type
        self.downsample = downsample
        self.transition = _conv(lower_channels, channels, norm=norm, relu=True)
        if downsample == "conv":
            self.down = _conv(channels, channels, kernel_size=3, stride=2, norm=norm, relu=True)
        else:
            self.down = nn.MaxPool2d(kernel_size=2, stride=2)
        self.compress = _conv(upper_channels, channels, norm=norm, relu=True)
        self.out_channels = 3 * channels if fuse_type == "cat" else channels

    def forward(self, lower: torch.Tensor, cur: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Fuse three neighbouring levels.

        Args:
            lower: C(i-1), float ``(N, C_lo, 2H, 2W)``.
            cur: C(i), float ``(N, C, H, W)``.
            upper: C(i+1), float ``(N, C_up, H/2, W/2)``.

        Returns:
            float ``(N, out_channels, H, W)``.
        """
        t = self.down(self.transition(lower))
        u = _up(self.compress(upper), 2)
        assert t.shape == cur.shape == u.shape, (t.shape, cur.shape, u.shape)
        if self.fuse_type == "cat":
            return torch.cat([t, cur, u], dim=1)
        return t + cur + u


class MFEFPN(Backbone):
    """MFE feature pyramid over a ResNet; outputs ``p2..p6`` (strides 4..64), all ``out_channels`` wide.

    Build it from a config with ``MFEFPN(cfg, input_shape)`` or the registered ``build_mfe_fpn_backbone``; both
    names (``MFEFPN`` and ``build_mfe_fpn_backbone``) work as ``MODEL.BACKBONE.NAME``.
    """

    @configurable
    def __init__(self, *, bottom_up: Backbone, in_features: List[str], out_channels: int, norm: str = "",
                 fuse_type: str = "cat", downsample: str = "pool", dense_top_down: bool = True,
                 p6_downsample: str = "pool"):
        """
        Args:
            bottom_up: a Detectron2 ``ResNet`` (must have ``stem.conv1``, the stride-2 conv giving C1) whose outputs
                include ``in_features``.
            in_features: the four bottom-up outputs used as C2..C5, e.g. ``["res2", "res3", "res4", "res5"]``.
            out_channels: channels of every output level.
            norm: norm of the MFE and pyramid convs ("", "GN", "BN", "SyncBN").
            fuse_type: MFE merge, ``"cat"`` or ``"add"``.
            downsample: MFE down-sampling of C(i-1), ``"pool"`` or ``"conv"``.
            dense_top_down: P(i) also takes up4(P(i+2)).
            p6_downsample: P6 from P5, ``"pool"`` (stride-2 subsampling) or ``"conv"`` (3×3 stride 2).
        """
        super().__init__()
        assert isinstance(bottom_up, Backbone), type(bottom_up)
        if len(in_features) != 4:
            raise ValueError(f"MODEL.MFEFPN.IN_FEATURES needs C2..C5 (4 names), got {in_features}")
        if p6_downsample not in ("pool", "conv"):
            raise ValueError(f"MODEL.MFEFPN.P6_DOWNSAMPLE must be 'pool' or 'conv', got {p6_downsample!r}")
        stem_conv = getattr(getattr(bottom_up, "stem", None), "conv1", None)
        if not isinstance(stem_conv, nn.Module):
            raise ValueError("MFEFPN needs a ResNet bottom-up whose stem has conv1 (the stride-2 C1 conv)")
        bu_shapes = bottom_up.output_shape()
        for f in in_features:
            assert f in bu_shapes, f"bottom-up has no output {f!r} (set MODEL.RESNETS.OUT_FEATURES)"
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.dense_top_down = dense_top_down
        self._c1_cache: Dict[int, torch.Tensor] = {}
        stem_conv.register_forward_hook(self._keep_c1)

        # channels/strides of C1..C5
        c1_channels = stem_conv.out_channels
        c1_stride = bu_shapes[in_features[0]].stride // 2
        chans = [c1_channels] + [bu_shapes[f].channels for f in in_features]
        strides = [c1_stride] + [bu_shapes[f].stride for f in in_features]
        for a, b in zip(strides[:-1], strides[1:]):
            assert b == 2 * a, f"bottom-up strides must double per level, got {strides}"
        assert strides[1] == 4, f"C2 must have stride 4, got {strides[1]}"

        # MFE(2..4) and their 1x1 laterals; index k=0,1,2 is level k+2
        self.mfe = nn.ModuleList()
        self.lateral = nn.ModuleList()
        self.top_down = nn.ModuleList()
        for k in range(3):
            lo, cur, up = chans[k], chans[k + 1], chans[k + 2]
            mfe = MFEModule(lower_channels=lo, channels=cur, upper_channels=up, fuse_type=fuse_type,
                            downsample=downsample, norm=norm)
            self.mfe.append(mfe)
            self.lateral.append(_conv(mfe.out_channels, out_channels, norm=norm))
            # inputs: lateral, up2(P(i+1)) and, if dense, up4(P(i+2)) (P6 for i=4)
            n_in = 3 if dense_top_down else 2
            self.top_down.append(_conv(n_in * out_channels, out_channels, norm=norm))
        self.p5 = _conv(chans[4], out_channels, norm=norm)
        if p6_downsample == "conv":
            self.p6 = _conv(out_channels, out_channels, kernel_size=3, stride=2, norm=norm)
        else:
            self.p6 = nn.MaxPool2d(kernel_size=1, stride=2)

        self._out_features = [f"p{i}" for i in range(2, 7)]
        self._out_feature_strides = {f"p{i}": 2 ** i for i in range(2, 7)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = 64

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {
            "bottom_up": build_resnet_backbone(cfg, input_shape),
            "in_features": cfg.MODEL.MFEFPN.IN_FEATURES,
            "out_channels": cfg.MODEL.MFEFPN.OUT_CHANNELS,
            "norm": cfg.MODEL.MFEFPN.NORM,
            "fuse_type": cfg.MODEL.MFEFPN.FUSE_TYPE,
            "downsample": cfg.MODEL.MFEFPN.DOWNSAMPLE,
            "dense_top_down": cfg.MODEL.MFEFPN.DENSE_TOP_DOWN,
            "p6_downsample": cfg.MODEL.MFEFPN.P6_DOWNSAMPLE,
        }

    def _keep_c1(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # forward hook on stem.conv1: remember its (normalised, pre-ReLU) output for this forward pass
        self._c1_cache[id(self)] = output

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: float ``(N, C_in, H, W)``, H and W multiples of 64.

        Returns:
            dict ``p2..p6`` → float ``(N, out_channels, H / 2**i, W / 2**i)``.
        """
        assert x.shape[-2] % 64 == 0 and x.shape[-1] % 64 == 0, (
            f"MFEFPN input {tuple(x.shape)} must be padded to multiples of size_divisibility=64")
        bu = self.bottom_up(x)
        c1 = F.relu(self._c1_cache.pop(id(self)))
        cs = [c1] + [bu[f] for f in self.in_features]  # C1..C5

        p5 = self.p5(cs[4])
        p6 = self.p6(p5)
        results = {5: p5, 6: p6}
        for level in (4, 3, 2):
            k = level - 2
            mfe = self.mfe[k](cs[k], cs[k + 1], cs[k + 2])
            parts = [self.lateral[k](mfe), _up(results[level + 1], 2)]
            if self.dense_top_down:
                parts.append(_up(results[level + 2], 4))
            for p in parts[1:]:
                assert p.shape == parts[0].shape, (level, [tuple(q.shape) for q in parts])
            results[level] = self.top_down[k](torch.cat(parts, dim=1))
        return {f"p{i}": results[i] for i in range(2, 7)}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


# ``MODEL.BACKBONE.NAME: "MFEFPN"`` resolves to the class (a configurable called as ``MFEFPN(cfg, input_shape)``).
BACKBONE_REGISTRY.register(MFEFPN)


@BACKBONE_REGISTRY.register()
def build_mfe_fpn_backbone(cfg, input_shape: ShapeSpec) -> MFEFPN:
    """Build ``MFEFPN`` from ``cfg`` (``MODEL.RESNETS.*`` for the bottom-up, ``MODEL.MFEFPN.*`` for the rest).

    Args:
        cfg: a Detectron2 config with ``add_bmd_config`` applied.
        input_shape: ``ShapeSpec(channels=len(MODEL.PIXEL_MEAN))``.
    """
    return MFEFPN(cfg, input_shape)
