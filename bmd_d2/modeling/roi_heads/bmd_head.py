"""``BMDHead`` ROI heads: multi-level fusion for box and mask branches, plus the BMD branch.

* Box branch: every proposal is ROIAligned at 7×7 on all levels (``ROI_HEADS.IN_FEATURES``, p2..p6); the five maps
  are summed and go through Detectron2's box head / ``FastRCNNOutputLayers`` unchanged.
* Mask branch: ``MultiScaleFusionMaskHead`` on per-level pools (``ROI_FUSION.MASK_POOLER_RESOLUTIONS``).
* BMD branch (``ROI_BMD_HEAD_REGISTRY``, default ``BMDErosionEstimator``): mask probabilities → truncation
  (threshold → binary) → K stacked 3×3 erosions → eroded mask × fused 56×56 mask features → estimator
  (3×3 conv, pool, flatten, FC…, FC→1; with ``MODEL.ROI_BMD_HEAD.INTENSITY_INPUT`` the FC layers also get the eroded
  ROI's mean input intensity per channel and its area share, ROIAligned from the normalised image) → BMD (mg/cm³),
  or with ``MODEL.ROI_BMD_HEAD.TARGET: "hu"`` the trabecular CT number (HU), which the measurement turns into mg/cm³
  with the study's own calibration (a value the image alone cannot give: the HU ↔ BMD line differs between
  scanners), or with ``"hu_correction"`` the HU to add to the measured 3-D core HU (the measurement's own bias).
  Neither truncation nor erosion passes gradient.

The BMD branch needs the mask head's fused features, so it runs inside ``_forward_mask`` (which
``StandardROIHeads.forward`` calls in training and ``forward_with_given_boxes`` at inference); nothing of Detectron2's
``forward`` is copied. ``gt_bmd`` / ``gt_trabecular_hu`` reach the sampled proposals through Detectron2's
``label_and_sample_proposals``.
"""
import logging
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ROIAlign, ShapeSpec, cat
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads, build_mask_head
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances
from detectron2.utils.registry import Registry

from .fusion import MultiLevelROIPooler

__all__ = [
    "ROI_BMD_HEAD_REGISTRY",
    "build_bmd_head",
    "stacked_erosion",
    "truncate_mask",
    "BMDErosionEstimator",
    "BMDHead",
]

logger = logging.getLogger(__name__)

ROI_BMD_HEAD_REGISTRY = Registry("ROI_BMD_HEAD")
ROI_BMD_HEAD_REGISTRY.__doc__ = """
Registry for BMD branches: modules called as ``head(fused, mask_probs, instances, image_rois=None)`` with fused ROI
features ``(R, C, S, S)``, mask probabilities ``(R, S, S)`` and the normalised input image ROIAligned on the same grid
``(R, C_img, S, S)`` (given when the head's ``needs_image_rois`` is True), returning ``{"loss_bmd": ...}`` in
training and setting
``pred_bmd`` (float32 ``(R_i,)``, mg/cm³) or, for a head trained on the trabecular CT number, ``pred_trabecular_hu``
(float32 ``(R_i,)``, HU) or ``pred_hu_correction`` (HU to add to the measured 3-D core HU) on the instances at
inference. Built as ``cls(cfg, input_shape)`` with
``input_shape = ShapeSpec(channels=C, height=S, width=S)``.
"""


def truncate_mask(mask_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Truncation: probabilities → binary mask (no gradient).

    Args:
        mask_probs: float ``(R, H, W)`` in [0, 1].
        threshold: pixels with probability ``> threshold`` are foreground.

    Returns:
        float ``(R, H, W)`` of 0/1, detached.
    """
    assert mask_probs.dim() == 3, tuple(mask_probs.shape)
    with torch.no_grad():
        return (mask_probs.detach() > threshold).to(mask_probs.dtype)


def stacked_erosion(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """Stacked erosion: ``iterations`` × (3×3 stride-1 min-pool, padding 1), no gradient.

    Everything outside the ROI grid counts as background (zero padding), so a mask touching the grid edge is eroded
    from that side too. Each iteration removes exactly one pixel of border (8-connected): a filled ``s×s`` square
    becomes ``(s-2K)×(s-2K)`` after K iterations, and any object thinner than ``2K+1`` pixels disappears (the result
    may be all zeros; the estimator then sees zero features).

    Args:
        mask: float ``(R, H, W)`` of 0/1.
        iterations: K ≥ 0.

    Returns:
        float ``(R, H, W)`` of 0/1, detached.
    """
    assert mask.dim() == 3, tuple(mask.shape)
    assert iterations >= 0, iterations
    with torch.no_grad():
        x = mask.detach()[:, None]
        for _ in range(iterations):
            # min-pool = -maxpool(-x); pad with 0 (background) so the grid border erodes as well
            x = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=0.0), kernel_size=3, stride=1)
        return x[:, 0]


def build_bmd_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the BMD branch named by ``cfg.MODEL.ROI_BMD_HEAD.NAME`` from ``ROI_BMD_HEAD_REGISTRY``."""
    return ROI_BMD_HEAD_REGISTRY.get(cfg.MODEL.ROI_BMD_HEAD.NAME)(cfg, input_shape)


@ROI_BMD_HEAD_REGISTRY.register()
class BMDErosionEstimator(nn.Module):
    """Truncation → stacked erosion → masked features → estimator → BMD; plus its loss.

    Estimator: 3×3 conv + ReLU (``conv_dim``) → adaptive average pool to ``pool_size``² → flatten →
    ``num_fc`` × (FC ``fc_dim`` + ReLU) → FC → 1 value, the target normalised as ``(value - bmd_mean) / bmd_std``.
    With ``intensity_input`` the flattened features are joined by ``image_channels`` + 1 numbers per ROI: the mean of
    each channel of the normalised input image over the eroded mask, and the eroded mask's share of the S×S grid.

    Targets (``target``): ``"bmd"`` — the vertebra's BMD (annotation ``bmd``, mg/cm³; instances get ``pred_bmd``);
    ``"hu"`` — its trabecular CT number (annotation ``trabecular_hu``, the noise-free mean HU of the trabecular core;
    instances get ``pred_trabecular_hu``), for a learned value that knows the scan: the measurement converts it with
    the study's calibration (:mod:`bmd_d2.measure.classical`); ``"hu_correction"`` — what to add to the
    vertebra's *measured* trabecular HU (annotation ``core_hu``: the classical 3-D core's mean HU, as the measurement
    reads it with the predicted mask) to reach its own HU (``trabecular_hu`` target minus ``core_hu``; instances get
    ``pred_hu_correction``): a learned correction of the measurement's partial volume, rim and sampling bias, which
    the measurement adds to the 3-D core HU before its calibration.
    """

    TARGETS = {"bmd": ("gt_bmd", "pred_bmd"), "hu": ("gt_trabecular_hu", "pred_trabecular_hu"),
               "hu_correction": ("gt_trabecular_hu", "pred_hu_correction")}
    #: targets learned as a difference: the field subtracted from the target field in training
    BASE_FIELDS = {"hu_correction": "gt_core_hu"}

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, mask_threshold: float = 0.5, erosion_iters: int = 3,
                 conv_dim: int = 64, fc_dim: int = 1024, num_fc: int = 1, pool_size: int = 14,
                 bmd_mean: float = 140.0, bmd_std: float = 50.0, loss_type: str = "smooth_l1",
                 smooth_l1_beta: float = 0.1, loss_weight: float = 1.0, target: str = "bmd",
                 intensity_input: bool = False, image_channels: int = 3):
        """
        Args:
            input_shape: fused ROI features, ``ShapeSpec(channels=C, height=S, width=S)``.
            mask_threshold: truncation threshold on mask probability.
            erosion_iters: K stacked erosions (pixels of the S×S ROI grid).
            conv_dim: channels of the 3×3 conv.
            fc_dim: units of each hidden FC layer.
            num_fc: hidden FC layers before the final FC→1 (≥ 0).
            pool_size: side the conv output is average-pooled to before flattening (≤ S).
            bmd_mean: target normalisation mean (mg/cm³, or HU for ``target="hu"``).
            bmd_std: target normalisation std, same unit (> 0).
            loss_type: ``"smooth_l1"`` or ``"l1"`` on normalised targets.
            smooth_l1_beta: beta of smooth-L1 (normalised units).
            loss_weight: multiplier of ``loss_bmd``.
            target: ``"bmd"`` or ``"hu"`` (see the class docstring).
            intensity_input: join the eroded ROI's mean input intensity and area share to the FC input.
            image_channels: channels of the input image (``len(MODEL.PIXEL_MEAN)``).
        """
        super().__init__()
        if target not in self.TARGETS:
            raise ValueError(f"MODEL.ROI_BMD_HEAD.TARGET must be one of {sorted(self.TARGETS)}, got {target!r}")
        self.target = target
        self.gt_field, self.pred_field = self.TARGETS[target]
        self.base_field = self.BASE_FIELDS.get(target)
        if loss_type not in ("smooth_l1", "l1"):
            raise ValueError(f"MODEL.ROI_BMD_HEAD.LOSS_TYPE must be 'smooth_l1' or 'l1', got {loss_type!r}")
        if bmd_std <= 0:
            raise ValueError(f"MODEL.ROI_BMD_HEAD.BMD_STD must be > 0, got {bmd_std}")
        assert input_shape.height == input_shape.width and pool_size <= input_shape.height, (input_shape, pool_size)
        self.in_channels = input_shape.channels
        self.size = input_shape.height
        self.mask_threshold = float(mask_threshold)
        self.erosion_iters = int(erosion_iters)
        self.pool_size = int(pool_size)
        self.bmd_mean = float(bmd_mean)
        self.bmd_std = float(bmd_std)
        self.loss_type = loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_weight = float(loss_weight)

        self.conv = Conv2d(self.in_channels, conv_dim, kernel_size=3, padding=1, activation=nn.ReLU())
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.conv.bias, 0.0)
        self.intensity_input = bool(intensity_input)
        self.image_channels = int(image_channels)
        fcs: List[nn.Module] = []
        dim = conv_dim * self.pool_size * self.pool_size + (self.image_channels + 1 if self.intensity_input else 0)
        for _ in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0.0)
            fcs += [fc, nn.ReLU()]
            dim = fc_dim
        self.fcs = nn.Sequential(*fcs)
        self.predictor = nn.Linear(dim, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        c = cfg.MODEL.ROI_BMD_HEAD
        return {
            "input_shape": input_shape,
            "mask_threshold": c.MASK_THRESHOLD,
            "erosion_iters": c.EROSION_ITERS,
            "conv_dim": c.CONV_DIM,
            "fc_dim": c.FC_DIM,
            "num_fc": c.NUM_FC,
            "pool_size": c.POOL_SIZE,
            "bmd_mean": c.BMD_MEAN,
            "bmd_std": c.BMD_STD,
            "loss_type": c.LOSS_TYPE,
            "smooth_l1_beta": c.SMOOTH_L1_BETA,
            "loss_weight": c.LOSS_WEIGHT,
            "target": c.TARGET,
            "intensity_input": c.INTENSITY_INPUT,
            "image_channels": len(cfg.MODEL.PIXEL_MEAN),
        }

    @property
    def needs_image_rois(self) -> bool:
        """Whether :meth:`forward` needs ``image_rois`` (the caller ROIAligns the input image for it)."""
        return self.intensity_input

    @staticmethod
    def roi_intensity(image_rois: torch.Tensor, eroded: torch.Tensor) -> torch.Tensor:
        """Per ROI: the mean of each image channel over the eroded mask and the mask's share of the grid.

        Args:
            image_rois: float ``(R, C_img, S, S)``; eroded: float 0/1 ``(R, S, S)``.

        Returns:
            float ``(R, C_img + 1)``; an empty mask gives zero means.
        """
        area = eroded.sum(dim=(1, 2))
        means = (image_rois * eroded[:, None]).sum(dim=(2, 3)) / area.clamp(min=1.0)[:, None]
        return torch.cat([means, (area / float(eroded.shape[-1] * eroded.shape[-2]))[:, None]], dim=1)

    def layers(self, masked: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Estimator: masked features float ``(R, C, S, S)`` (and with ``intensity_input`` the
        :meth:`roi_intensity` values ``(R, C_img + 1)``) → normalised BMD float ``(R,)``."""
        x = self.conv(masked)
        x = torch.flatten(F.adaptive_avg_pool2d(x, self.pool_size), start_dim=1)
        if self.intensity_input:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        return self.predictor(self.fcs(x))[:, 0]

    def forward(self, fused: torch.Tensor, mask_probs: torch.Tensor, instances: List[Instances],
                image_rois: Optional[torch.Tensor] = None):
        """
        Args:
            fused: fused ROI features float ``(R, C, S, S)`` (R over all images).
            mask_probs: mask probabilities (or 0/1 GT masks) float ``(R, S, S)``.
            instances: per image; training: foreground proposals with ``gt_bmd`` float32 ``(R_i,)`` mg/cm³
                (``gt_trabecular_hu``, HU, for ``target="hu"``; non-finite values are ignored); inference:
                predictions.
            image_rois: the normalised input image ROIAligned on the S×S grid of each ROI, float
                ``(R, C_img, S, S)``; required with ``intensity_input``.

        Returns:
            training: ``{"loss_bmd": scalar}`` (a graph-connected zero when there is no valid target);
            inference: ``instances`` with ``pred_bmd`` float32 ``(R_i,)`` mg/cm³ (``pred_trabecular_hu``, HU).
        """
        num = sum(len(x) for x in instances)
        assert fused.shape == (num, self.in_channels, self.size, self.size), (tuple(fused.shape), num)
        assert mask_probs.shape == (num, self.size, self.size), (tuple(mask_probs.shape), num)
        eroded = stacked_erosion(truncate_mask(mask_probs, self.mask_threshold), self.erosion_iters)
        extra = None
        if self.intensity_input:
            if image_rois is None:
                raise ValueError("MODEL.ROI_BMD_HEAD.INTENSITY_INPUT needs the image ROIs: call the BMD head through "
                                 "BMDHead.forward (ROI heads given the images)")
            assert image_rois.shape == (num, self.image_channels, self.size, self.size), tuple(image_rois.shape)
            extra = self.roi_intensity(image_rois.to(fused.dtype), eroded)
        pred = self.layers(fused * eroded[:, None], extra)
        assert pred.shape == (num,), tuple(pred.shape)

        if self.training:
            fields = [self.gt_field] + ([self.base_field] if self.base_field else [])
            for x in instances:
                for f in fields:
                    if not x.has(f):
                        raise KeyError(f"BMD branch needs '{f}' on the training instances (see BMDDatasetMapper)")
            gt = cat([x.get(self.gt_field) for x in instances], dim=0).to(pred.dtype) if num else \
                pred.new_zeros((0,))
            if self.base_field and num:  # a NaN base (no measured core) makes the target NaN: ignored below
                gt = gt - cat([x.get(self.base_field) for x in instances], dim=0).to(pred.dtype)
            assert gt.shape == pred.shape, (tuple(gt.shape), tuple(pred.shape))
            valid = torch.isfinite(gt)
            if not bool(valid.any()):
                # keep every estimator parameter in the graph (DDP) with a zero value
                return {"loss_bmd": pred.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0}
            target = (gt[valid] - self.bmd_mean) / self.bmd_std
            if self.loss_type == "l1":
                loss = F.l1_loss(pred[valid], target, reduction="mean")
            else:
                loss = F.smooth_l1_loss(pred[valid], target, beta=self.smooth_l1_beta, reduction="mean")
            return {"loss_bmd": loss * self.loss_weight}

        value = (pred * self.bmd_std + self.bmd_mean).to(torch.float32)
        for x, b in zip(instances, value.split([len(x) for x in instances])):
            x.set(self.pred_field, b)
        return instances


@ROI_HEADS_REGISTRY.register()
class BMDHead(StandardROIHeads):
    """Standard ROI heads with all-level ROI fusion (box: 7×7 sum; mask: ``MultiScaleFusionMaskHead``) and a BMD
    branch. See the module docstring.
    """

    @configurable
    def __init__(self, *, bmd_head: Optional[nn.Module] = None, bmd_mask_source: str = "gt", **kwargs):
        """
        Args:
            bmd_head: the BMD branch (``ROI_BMD_HEAD_REGISTRY``), None to disable it.
            bmd_mask_source: masks fed to the BMD branch in training: ``"pred"`` (predicted masks of the GT class,
                method's mode 1) or ``"gt"`` (ground-truth masks, mode 2). Inference always uses predicted masks.
            **kwargs: ``StandardROIHeads`` arguments; ``box_pooler``/``mask_pooler`` are ``MultiLevelROIPooler``.
        """
        super().__init__(**kwargs)
        if bmd_mask_source not in ("pred", "gt"):
            raise ValueError(f"MODEL.ROI_BMD_HEAD.MASK_SOURCE must be 'pred' or 'gt', got {bmd_mask_source!r}")
        self.bmd_on = bmd_head is not None
        if self.bmd_on and not self.mask_on:
            raise ValueError("MODEL.BMD_ON needs MODEL.MASK_ON: the BMD branch reads the mask branch's features")
        if self.mask_on and not hasattr(self.mask_head, "forward_with_fused"):
            raise ValueError("BMDHead needs a fusion mask head (MODEL.ROI_MASK_HEAD.NAME: MultiScaleFusionMaskHead)")
        self.bmd_head = bmd_head
        self.bmd_mask_source = bmd_mask_source
        self._images = None  # the ImageList of the current forward, for heads that read the input image

    def forward(self, images, features, proposals, targets=None):
        """``StandardROIHeads.forward``, with the input images kept for the duration of the call so a BMD branch
        that reads them (``needs_image_rois``) can ROIAlign them."""
        self._images = images
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._images = None

    def _image_rois(self, boxes: List, size: int) -> Optional[torch.Tensor]:
        """The normalised input image ROIAligned at ``size``² in each box, float ``(R, C_img, size, size)``; None when
        the BMD branch does not read the image."""
        if not getattr(self.bmd_head, "needs_image_rois", False):
            return None
        if self._images is None:
            raise ValueError("MODEL.ROI_BMD_HEAD.INTENSITY_INPUT needs the input image: the ROI heads were called "
                             "without it (forward_with_given_boxes alone)")
        rois = convert_boxes_to_pooler_format(boxes)
        return ROIAlign((size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)(self._images.tensor, rois)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(cls._init_bmd_head(cfg, input_shape))
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        in_features = ret["box_in_features"]
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        ret["box_pooler"] = MultiLevelROIPooler(
            output_sizes=[res] * len(in_features),
            scales=[1.0 / input_shape[f].stride for f in in_features],
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            fuse="sum",
        )
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if not cfg.MODEL.MASK_ON:
            return {}
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        sizes = list(cfg.MODEL.ROI_FUSION.MASK_POOLER_RESOLUTIONS)
        if len(sizes) != len(in_features):
            raise ValueError(f"MODEL.ROI_FUSION.MASK_POOLER_RESOLUTIONS {sizes} needs one size per "
                             f"MODEL.ROI_HEADS.IN_FEATURES {list(in_features)}")
        channels = {input_shape[f].channels for f in in_features}
        assert len(channels) == 1, f"all ROI levels must share channels, got {channels}"
        ch = channels.pop()
        pooler = MultiLevelROIPooler(
            output_sizes=sizes,
            scales=[1.0 / input_shape[f].stride for f in in_features],
            sampling_ratio=cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE,
            fuse=None,
        )
        shapes = [ShapeSpec(channels=ch, height=s, width=s) for s in sizes]
        return {"mask_in_features": in_features, "mask_pooler": pooler, "mask_head": build_mask_head(cfg, shapes)}

    @classmethod
    def _init_bmd_head(cls, cfg, input_shape):
        if not cfg.MODEL.BMD_ON:
            return {"bmd_head": None}
        if not cfg.MODEL.MASK_ON:
            raise ValueError("MODEL.BMD_ON needs MODEL.MASK_ON: the BMD branch reads the mask branch's features")
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        size = max(cfg.MODEL.ROI_FUSION.MASK_POOLER_RESOLUTIONS)
        shape = ShapeSpec(channels=input_shape[in_features[0]].channels, height=size, width=size)
        return {"bmd_head": build_bmd_head(cfg, shape), "bmd_mask_source": cfg.MODEL.ROI_BMD_HEAD.MASK_SOURCE}

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """Mask branch on all-level pools, then the BMD branch on the fused features.

        Args:
            features: backbone maps by name, float ``(N, C, H_l, W_l)``.
            instances: training: sampled proposals (foreground selected here); inference: predictions.

        Returns:
            training: ``{"loss_mask", "loss_bmd"}``; inference: instances with ``pred_masks``
            float ``(R_i, 1, M, M)`` and ``pred_bmd`` float32 ``(R_i,)``.
        """
        if not self.mask_on:
            return {} if self.training else instances
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        out, fused, logits = self.mask_head.forward_with_fused(pooled, instances)
        if self.bmd_on:
            bmd_out = self._forward_bmd(fused, logits, instances)
            if self.training:
                out.update(bmd_out)
        return out

    def _forward_bmd(self, fused: torch.Tensor, mask_logits: torch.Tensor,
                     instances: List[Instances]) -> Union[Dict[str, torch.Tensor], List[Instances]]:
        """BMD branch.

        Args:
            fused: fused mask features float ``(R, C, S, S)``.
            mask_logits: float ``(R, K, M, M)``, M a multiple of S (K = 1 if class-agnostic).
            instances: as in :meth:`_forward_mask` (after foreground selection in training).

        Returns:
            ``{"loss_bmd"}`` in training, else ``instances`` with ``pred_bmd``.
        """
        size = fused.shape[-1]
        num = fused.shape[0]
        with torch.no_grad():
            if self.training and self.bmd_mask_source == "gt":
                if num:
                    masks = cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, size).to(fused.dtype)
                                 for x in instances], dim=0)
                else:
                    masks = fused.new_zeros((0, size, size))
            else:
                if self.training:  # mode 1: predicted probability of each proposal's GT class
                    probs = mask_logits.detach().sigmoid()
                    if probs.shape[1] > 1:
                        cls = cat([x.gt_classes for x in instances], dim=0) if num else probs.new_zeros(
                            (0,), dtype=torch.long)
                        probs = probs[torch.arange(num, device=probs.device), cls]
                    else:
                        probs = probs[:, 0]
                else:  # inference: pred_masks set by mask_rcnn_inference, (R_i, 1, M, M) probabilities
                    probs = cat([x.pred_masks for x in instances], dim=0)[:, 0] if num else \
                        mask_logits.new_zeros((0,) + tuple(mask_logits.shape[-2:]))
                factor = probs.shape[-1] // size
                assert probs.shape[-1] == factor * size, (tuple(probs.shape), size)
                masks = F.avg_pool2d(probs[:, None], factor)[:, 0] if factor > 1 else probs
        assert masks.shape == (num, size, size), (tuple(masks.shape), num, size)
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        image_rois = self._image_rois(boxes, size)
        if image_rois is None:
            return self.bmd_head(fused, masks, instances)
        return self.bmd_head(fused, masks, instances, image_rois=image_rois)
