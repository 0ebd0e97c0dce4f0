"""Multi-level ROI pooling: every proposal is ROIAligned on *all* pyramid levels (not one level per box).

Built from Detectron2's public ``ROIPooler`` (one single-level pooler per feature map), so ROIAlign semantics
(``ROIAlignV2``, sampling ratio) are exactly Detectron2's.
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

__all__ = ["MultiLevelROIPooler"]


class MultiLevelROIPooler(nn.Module):
    """Pool each box on every level; return the per-level tensors, or their element-wise sum / max.

    Args:
        output_sizes: pooled side per level, e.g. ``(7, 7, 7, 7, 7)`` or ``(56, 56, 28, 28, 14)``.
        scales: ``1 / stride`` per level, same order as the feature list given to ``forward``.
        sampling_ratio: ROIAlign sampling ratio (0 = adaptive).
        pooler_type: a Detectron2 pooler type, e.g. ``"ROIAlignV2"``.
        fuse: ``"sum"`` or ``"max"`` (all sizes must then be equal) → one tensor; ``None`` → list per level.
    """

    def __init__(self, *, output_sizes: Sequence[int], scales: Sequence[float], sampling_ratio: int = 0,
                 pooler_type: str = "ROIAlignV2", fuse: Optional[str] = None):
        super().__init__()
        assert len(output_sizes) == len(scales) > 0, (output_sizes, scales)
        if fuse not in (None, "sum", "max"):
            raise ValueError(f"fuse must be None, 'sum' or 'max', got {fuse!r}")
        if fuse is not None and len(set(output_sizes)) != 1:
            raise ValueError(f"fuse={fuse!r} needs equal output sizes, got {list(output_sizes)}")
        self.output_sizes = [int(s) for s in output_sizes]
        self.fuse = fuse
        self.level_poolers = nn.ModuleList(
            ROIPooler(output_size=s, scales=(sc,), sampling_ratio=sampling_ratio, pooler_type=pooler_type)
            for s, sc in zip(self.output_sizes, scales)
        )

    def forward(self, features: List[torch.Tensor], box_lists: List[Boxes]):
        """
        Args:
            features: one float ``(N, C, H_l, W_l)`` map per level (same order as ``scales``).
            box_lists: N ``Boxes`` (image coordinates), R boxes in total.

        Returns:
            ``fuse`` set: float ``(R, C, S, S)``; else a list of float ``(R, C, S_l, S_l)``, one per level.
        """
        assert len(features) == len(self.level_poolers), (len(features), len(self.level_poolers))
        pooled = [pooler([f], box_lists) for f, pooler in zip(features, self.level_poolers)]
        for p, s in zip(pooled, self.output_sizes):
            assert p.shape[-2:] == (s, s), (tuple(p.shape), s)
        if self.fuse == "sum":
            return torch.stack(pooled, dim=0).sum(dim=0)
        if self.fuse == "max":
            return torch.stack(pooled, dim=0).amax(dim=0)
        return pooled
