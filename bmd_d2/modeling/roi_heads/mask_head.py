"""``MultiScaleFusionMaskHead``: fuses per-level ROI features (56/28/14) into one 56×56 map, then predicts masks.

Input: the list from ``MultiLevelROIPooler(fuse=None)``, e.g. P2,P3 at 56×56, P4,P5 at 28×28, P6 at 14×14.

1. Levels of equal resolution are max-fused: m56 = max(P2, P3), m28 = max(P4, P5), m14 = P6.
2. Coarse to fine: ``y = m14; y = up2(relu(conv3x3(y))) + m28; y = up2(relu(conv3x3(y))) + m56`` → fused
   ``(R, C, 56, 56)`` (the map the BMD branch reads).
3. Conv module: 3×3 conv + ReLU → 1×1 conv to ``num_classes`` logits → bilinear upsampling by
   ``upsample_factor`` (default 2 → 112×112). Sigmoid is applied at inference (Detectron2's
   ``mask_rcnn_inference``), giving mask probabilities; training uses Detectron2's ``mask_rcnn_loss`` (per-pixel BCE
   on logits), both inherited from ``BaseMaskRCNNHead``.
"""
from typing import Dict, List, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference, mask_rcnn_loss
from detectron2.structures import Instances

__all__ = ["MultiScaleFusionMaskHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class MultiScaleFusionMaskHead(BaseMaskRCNNHead):
    """Mask head over multi-level pooled features (see module docstring)."""

    @configurable
    def __init__(self, input_shape: Sequence[ShapeSpec], *, num_classes: int, conv_dim: int, conv_norm: str = "",
                 upsample_factor: int = 2, **kwargs):
        """
        Args:
            input_shape: one ``ShapeSpec(channels, height, width)`` per pooled level; equal channels; square sizes
                that, sorted, form a chain of factor-2 steps (e.g. 56, 56, 28, 28, 14).
            num_classes: mask classes (1 if class-agnostic).
            conv_dim: channels of the 3×3 conv in the conv module.
            conv_norm: norm of the fusion and conv-module 3×3 convs ("", "GN", ...).
            upsample_factor: bilinear upsampling of the logits (1 = none).
            **kwargs: ``loss_weight``, ``vis_period`` of ``BaseMaskRCNNHead``.
        """
        super().__init__(**kwargs)
        shapes = list(input_shape)
        channels = {s.channels for s in shapes}
        assert len(channels) == 1, f"all pooled levels must share channels, got {channels}"
        assert all(s.height == s.width for s in shapes), shapes
        self.in_channels = channels.pop()
        self.level_sizes = [int(s.height) for s in shapes]
        self.resolutions = sorted(set(self.level_sizes))  # ascending, e.g. [14, 28, 56]
        for a, b in zip(self.resolutions[:-1], self.resolutions[1:]):
            assert b == 2 * a, f"pooled sizes must step by 2x, got {self.resolutions}"
        assert upsample_factor >= 1, upsample_factor
        self.num_classes = num_classes
        self.upsample_factor = int(upsample_factor)

        # one 3x3 conv before every 2x step of the coarse-to-fine fusion
        self.fuse_convs = nn.ModuleList()
        for _ in self.resolutions[1:]:
            conv = Conv2d(self.in_channels, self.in_channels, kernel_size=3, padding=1, bias=not conv_norm,
                          norm=get_norm(conv_norm, self.in_channels), activation=nn.ReLU())
            weight_init.c2_msra_fill(conv)
            self.fuse_convs.append(conv)
        self.mask_conv = Conv2d(self.in_channels, conv_dim, kernel_size=3, padding=1, bias=not conv_norm,
                                norm=get_norm(conv_norm, conv_dim), activation=nn.ReLU())
        weight_init.c2_msra_fill(self.mask_conv)
        self.predictor = Conv2d(conv_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape=input_shape,
            num_classes=1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=cfg.MODEL.ROI_MASK_HEAD.CONV_DIM,
            conv_norm=cfg.MODEL.ROI_MASK_HEAD.NORM,
            upsample_factor=cfg.MODEL.ROI_FUSION.MASK_UPSAMPLE_FACTOR,
        )
        return ret

    @property
    def fused_size(self) -> int:
        """Side of the fused feature map (the largest pooled size, 56)."""
        return self.resolutions[-1]

    @property
    def mask_size(self) -> int:
        """Side of the predicted mask logits: ``fused_size * upsample_factor``."""
        return self.fused_size * self.upsample_factor

    def fuse(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """Fuse per-level ROI features.

        Args:
            pooled: per level float ``(R, C, S_l, S_l)``, sizes as given at construction.

        Returns:
            float ``(R, C, S, S)``, S = ``fused_size``.
        """
        assert len(pooled) == len(self.level_sizes), (len(pooled), self.level_sizes)
        by_res: Dict[int, torch.Tensor] = {}
        for x, s in zip(pooled, self.level_sizes):
            assert x.shape[1:] == (self.in_channels, s, s), (tuple(x.shape), s)
            by_res[s] = x if s not in by_res else torch.maximum(by_res[s], x)
        y = by_res[self.resolutions[0]]
        for conv, res in zip(self.fuse_convs, self.resolutions[1:]):
            y = F.interpolate(conv(y), scale_factor=2.0, mode="nearest") + by_res[res]
        return y

    def predict(self, fused: torch.Tensor) -> torch.Tensor:
        """Conv module: fused float ``(R, C, S, S)`` → mask logits float ``(R, num_classes, M, M)``, M = mask_size."""
        x = self.predictor(self.mask_conv(fused))
        if self.upsample_factor > 1:
            x = F.interpolate(x, scale_factor=float(self.upsample_factor), mode="bilinear", align_corners=False)
        return x

    def layers(self, x: List[torch.Tensor]) -> torch.Tensor:
        """Pooled per-level features → mask logits ``(R, num_classes, M, M)`` (``BaseMaskRCNNHead`` contract)."""
        return self.predict(self.fuse(x))

    def forward_with_fused(
        self, x: List[torch.Tensor], instances: List[Instances]
    ) -> Tuple[Union[Dict[str, torch.Tensor], List[Instances]], torch.Tensor, torch.Tensor]:
        """Like ``forward`` (same loss / inference as ``BaseMaskRCNNHead``) but also returns the intermediate maps.

        Args:
            x: pooled per-level features as in :meth:`fuse`.
            instances: foreground proposals (training) or predictions (inference), R in total.

        Returns:
            (``{"loss_mask"}`` in training / ``instances`` with ``pred_masks`` at inference,
            fused float ``(R, C, S, S)``, mask logits float ``(R, num_classes, M, M)``)
        """
        fused = self.fuse(x)
        logits = self.predict(fused)
        if self.training:
            return {"loss_mask": mask_rcnn_loss(logits, instances, self.vis_period) * self.loss_weight}, fused, logits
        mask_rcnn_inference(logits, instances)
        return instances, fused, logits
