"""Test-time augmentation of the BMD model: shifted and resized passes over one sagittal image, merged into one set.

:class:`BMDRCNNWithTTA` wraps the built model the way Detectron2's ``GeneralizedRCNNWithTTA`` does: it owns the
test-time resize (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, as ``DefaultPredictor`` and
``BMDDatasetMapper`` at test time), runs ``model.inference`` once per pass and post-processes with Detectron2's
``detector_postprocess``. The passes (``MEASURE.TTA_SHIFTS``, ``MEASURE.TTA_SIZES``):

* the reference pass at the test size;
* one per shift ``(dy, dx)``: the image moved by whole pixels (zero fill), the detections moved back
  (:func:`unshift_pass`). The model sees the image at half its resolution (256² for the default 512² image), so a
  one-pixel shift samples the other phase of its grid and the averaged mask no longer jumps with the sub-pixel
  position of the anatomy;
* one per size: the model input resized to that shortest edge (unshifted); its learned BMD is not used (the BMD head
  was trained at the test size).

:func:`merge_tta_passes` averages the passes' mask probabilities, boxes, scores and BMD per reference detection.

Soft masks. ``detector_postprocess(..., mask_threshold=-1)`` does not keep the probabilities: Detectron2's
``paste_masks_in_image`` turns them into ``uint8`` ``255·p`` (truncated: up to 1/255 off) and ``BitMasks`` then casts
that to bool (``p ≥ 1/255``), in v0.6 and on main alike. So ``detector_postprocess`` maps the boxes to the image
(scale, clip, drop empty boxes) and :func:`paste_soft_masks` pastes the float probabilities with the same geometry as
Detectron2's mask pasting (equal to its internal float result, exactly; thresholded at 0.5 it gives its masks).
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import nn

from bmd_d2.errors import BMDError
from bmd_d2.utils.matching import box_iou, match_greedy

__all__ = [
    "BMDRCNNWithTTA", "parse_tta_shifts", "parse_tta_sizes", "shift_image", "unshift_pass", "paste_soft_masks",
    "merge_tta_passes", "instances_to_arrays",
]

Detections = Dict[str, Optional[np.ndarray]]


def parse_tta_shifts(value) -> List[tuple]:
    """``MEASURE.TTA_SHIFTS`` → list of ``(dy, dx)`` int pairs; ``BMDError`` naming the key for anything else.

    ``(0, 0)`` is dropped (the unshifted pass always runs); shifts are limited to ±8 pixels.
    """
    shifts = []
    for item in value or []:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 8 for v in item)
        if not ok:
            raise BMDError(f"MEASURE.TTA_SHIFTS must be a list of [dy, dx] integer pixel pairs within ±8, "
                           f"got {list(value)!r}")
        if tuple(item) != (0, 0) and tuple(item) not in shifts:
            shifts.append(tuple(int(v) for v in item))
    return shifts


def parse_tta_sizes(value, base: int) -> List[int]:
    """``MEASURE.TTA_SIZES`` → list of shortest-edge sizes other than ``base`` (``INPUT.MIN_SIZE_TEST``);
    ``BMDError`` naming the key for anything but integers in 32…4096."""
    sizes = []
    for item in value or []:
        if not (isinstance(item, int) and not isinstance(item, bool) and 32 <= item <= 4096):
            raise BMDError(f"MEASURE.TTA_SIZES must be a list of integer image sizes (shortest edge, 32-4096 px), "
                           f"got {list(value)!r}")
        if item != base and item not in sizes:
            sizes.append(int(item))
    return sizes


def instances_to_arrays(instances) -> Detections:
    """Detectron2 ``Instances`` (on any device) → dict of NumPy arrays.

    Returns:
        ``boxes`` float ``(R, 4)`` XYXY, ``scores`` ``(R,)``, ``classes`` int ``(R,)``, ``masks`` ``(R, H, W)`` as
        the instances hold them (bool after ``detector_postprocess``; None without ``pred_masks``), ``bmd`` float
        ``(R,)`` mg/cm³ (None without ``pred_bmd``), ``hu`` float ``(R,)`` the learned trabecular HU (None without
        ``pred_trabecular_hu``: a BMD head trained with ``MODEL.ROI_BMD_HEAD.TARGET "hu"``), ``hu_correction``
        float ``(R,)`` HU to add to the measured 3-D core HU (None without ``pred_hu_correction``: TARGET
        ``"hu_correction"``).
    """
    inst = instances.to("cpu")
    return {
        "boxes": inst.pred_boxes.tensor.numpy().astype(np.float64),
        "scores": inst.scores.numpy().astype(np.float64),
        "classes": inst.pred_classes.numpy().astype(np.int64),
        "masks": inst.pred_masks.numpy().astype(bool) if inst.has("pred_masks") else None,
        "bmd": inst.pred_bmd.numpy().astype(np.float64).reshape(-1) if inst.has("pred_bmd") else None,
        "hu": inst.pred_trabecular_hu.numpy().astype(np.float64).reshape(-1) if inst.has("pred_trabecular_hu")
        else None,
        "hu_correction": inst.pred_hu_correction.numpy().astype(np.float64).reshape(-1)
        if inst.has("pred_hu_correction") else None,
    }


#: The learned per-vertebra values of a pass (``bmd`` mg/cm³, ``hu`` and ``hu_correction`` HU), merged alike.
LEARNED_KEYS = ("bmd", "hu", "hu_correction")


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved by ``dy`` rows and ``dx`` columns (content leaving the frame is dropped, zeros enter)."""
    out = np.zeros_like(image)
    H, W = image.shape[:2]
    if abs(dy) >= H or abs(dx) >= W:
        return out
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        image[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def unshift_pass(dets: Detections, dy: int, dx: int) -> Detections:
    """Map the detections of an image shifted by ``(dy, dx)`` back to the unshifted image."""
    out = dict(dets)
    out["boxes"] = dets["boxes"] - np.array([dx, dy, dx, dy], np.float64)
    if dets.get("masks") is not None:
        m = dets["masks"]
        out["masks"] = np.stack([shift_image(x, -dy, -dx) for x in m]) if len(m) else m
    return out


def paste_soft_masks(masks, boxes, height: int, width: int) -> np.ndarray:
    """Paste ``(R, M, M)`` mask probabilities into ``(R, height, width)`` float32 at XYXY ``boxes`` ``(R, 4)``.

    The geometry of Detectron2's mask pasting: pixel centres mapped into the box and sampled bilinearly from the
    mask grid (``grid_sample``, ``align_corners=False``, zeros outside), within the box's pixel range plus one pixel.
    Thresholded at 0.5 it gives ``detector_postprocess``'s masks; here the probabilities are kept for averaging
    (Detectron2's public functions return them only as bool or truncated ``uint8``: see the module docstring).
    """
    R = int(masks.shape[0])
    out = np.zeros((R, height, width), np.float32)
    for i in range(R):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        c0, r0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        c1, r1 = min(int(math.ceil(x1)) + 1, width), min(int(math.ceil(y1)) + 1, height)
        if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
            continue
        gx = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        gy = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], dim=2)
        pasted = F.grid_sample(masks[i][None, None].float(), grid[None], mode="bilinear", align_corners=False)
        out[i, r0:r1, c0:c1] = pasted[0, 0].numpy()
    return out


def merge_tta_passes(passes: Sequence[Detections], min_iou: float = 0.5) -> Detections:
    """Merge test-time passes (shifted or resized; soft masks, all in the reference image's frame) into one set.

    The first pass is the reference: its detections are the ones reported (no pass adds or removes a vertebra).
    Every other pass is matched to it one to one by box IoU ≥ ``min_iou`` between detections of the same class
    (:func:`~bmd_d2.utils.matching.box_iou`, :func:`~bmd_d2.utils.matching.match_greedy`: highest IoU first). Per
    reference detection: the mask is the mean probability of the matched passes thresholded at 0.5, box and learned
    values (``bmd``, ``hu``, ``hu_correction``: :data:`LEARNED_KEYS`) are the matched passes' means, and the score
    is the mean over *all* passes (a pass that missed it counts 0, so an unstable detection loses confidence). A pass
    whose learned values are None (e.g. one at another input size) contributes to everything but them.

    Returns:
        as :func:`instances_to_arrays` (``masks`` bool).
    """
    ref = passes[0]
    R = len(ref["scores"])
    n_match = np.ones(R)
    boxes = ref["boxes"].copy()
    score_sum = ref["scores"].copy()
    has_masks = ref.get("masks") is not None
    mask_sum = ref["masks"].astype(np.float32) if has_masks else None
    learned = {k: [ref[k].copy(), np.ones(R)] for k in LEARNED_KEYS if ref.get(k) is not None}
    for other in passes[1:]:
        if not len(other["scores"]) or not R:
            continue
        iou = box_iou(ref["boxes"], other["boxes"])
        iou[ref["classes"][:, None] != other["classes"][None, :]] = 0.0
        for i, j in match_greedy(iou, min_iou):
            n_match[i] += 1
            boxes[i] += other["boxes"][j]
            score_sum[i] += other["scores"][j]
            if has_masks and other.get("masks") is not None:
                mask_sum[i] += other["masks"][j]
            for k, (total, count) in learned.items():
                if other.get(k) is not None:
                    total[i] += other[k][j]
                    count[i] += 1
    return {
        "boxes": boxes / n_match[:, None],
        "scores": score_sum / len(passes),
        "classes": ref["classes"].copy(),
        "masks": (mask_sum / n_match[:, None, None] >= 0.5) if has_masks else None,
        **{k: (learned[k][0] / learned[k][1] if k in learned else None) for k in LEARNED_KEYS},
    }


class BMDRCNNWithTTA(nn.Module):
    """The BMD model with test-time shifts and sizes, on one image in the model's channel order (``INPUT.FORMAT``).

    Calling it runs every pass and returns the merged detections as NumPy arrays at the image's size
    (:func:`merge_tta_passes`); without shifts and sizes it is one pass post-processed exactly as ``DefaultPredictor``
    does it (:meth:`predict`).

    Example::

        tta = BMDRCNNWithTTA(cfg, model)          # cfg: INPUT.MIN/MAX_SIZE_TEST, MEASURE.TTA_SHIFTS/TTA_SIZES
        dets = tta(image)                          # image: (H, W, 3) uint8, channels as INPUT.FORMAT says
    """

    @configurable
    def __init__(self, model: nn.Module, *, min_size: int, max_size: int, shifts: Sequence[tuple] = (),
                 sizes: Sequence[int] = ()):
        """
        Args:
            model: a built ``GeneralizedRCNN`` (in eval mode).
            min_size, max_size: the test-time ``ResizeShortestEdge`` (``INPUT.MIN_SIZE_TEST`` (0: no resize),
                ``INPUT.MAX_SIZE_TEST``).
            shifts: ``(dy, dx)`` pixel shifts of the extra passes (:func:`parse_tta_shifts`).
            sizes: shortest-edge sizes of the extra resized passes (:func:`parse_tta_sizes`).
        """
        super().__init__()
        self.model = model
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.aug = T.ResizeShortestEdge([self.min_size, self.min_size], self.max_size)
        self.shifts = list(shifts)
        self.sizes = list(sizes)

    @classmethod
    def from_config(cls, cfg, model):
        return {
            "model": model,
            "min_size": cfg.INPUT.MIN_SIZE_TEST,
            "max_size": cfg.INPUT.MAX_SIZE_TEST,
            "shifts": parse_tta_shifts(cfg.MEASURE.TTA_SHIFTS),
            "sizes": parse_tta_sizes(cfg.MEASURE.TTA_SIZES, int(cfg.INPUT.MIN_SIZE_TEST)),
        }

    def model_input(self, image: np.ndarray, size: Optional[int] = None) -> Dict:
        """The model's input dict for ``image``: ``{"image": float32 (3, h, w), "height": H, "width": W}``.

        Args:
            image: ``(H, W, 3)`` in the model's channel order.
            size: shortest edge of the model input instead of ``INPUT.MIN_SIZE_TEST`` (the longest-edge limit
                ``INPUT.MAX_SIZE_TEST`` scales by the same factor); None = the test size.
        """
        H, W = image.shape[:2]
        aug = self.aug
        if size is not None:
            base = self.min_size or min(H, W)  # 0 = no resize: the reference pass sees H × W
            aug = T.ResizeShortestEdge([size, size], int(round(self.max_size * size / base)))
        x = aug.get_transform(image).apply_image(image)
        return {"image": torch.as_tensor(np.ascontiguousarray(x).astype("float32").transpose(2, 0, 1)),
                "height": H, "width": W}

    def inference(self, image: np.ndarray, size: Optional[int] = None) -> Instances:
        """One pass of the model (``size`` as in :meth:`model_input`); raw instances at the model input's size."""
        return self.inference_batch([image], size)[0]

    def inference_batch(self, images: Sequence[np.ndarray], size: Optional[int] = None) -> List[Instances]:
        """Passes over several images of one size, run as one batch (:meth:`inference` of each, in one model call:
        the same instances, the per-call overhead paid once)."""
        with torch.no_grad():
            return self.model.inference([self.model_input(im, size) for im in images], do_postprocess=False)

    def predict(self, image: np.ndarray) -> Instances:
        """One pass at the test size as ``DefaultPredictor`` returns it: ``detector_postprocess`` to the image's size
        (boxes scaled and clipped, empty boxes dropped, masks pasted and thresholded at 0.5)."""
        H, W = image.shape[:2]
        return detector_postprocess(self.inference(image), H, W)

    @staticmethod
    def soft_detections(inst: Instances, H: int, W: int) -> Detections:
        """Raw instances of one pass → arrays at the image's size ``H × W`` keeping the mask probabilities: the
        geometry of :meth:`predict`, masks pasted as float32 ``(R, H, W)`` probabilities (:func:`paste_soft_masks`)
        instead of thresholded."""
        fields = {k: v for k, v in inst.get_fields().items() if k != "pred_masks"}
        bare = Instances(inst.image_size, **fields)
        bare.source_index = torch.arange(len(inst), device=inst.scores.device)
        out = detector_postprocess(bare, H, W).to("cpu")  # the geometry of predict(), without pasting the masks
        dets = instances_to_arrays(out)
        if inst.has("pred_masks"):
            kept = inst.pred_masks[out.source_index.to(inst.pred_masks.device)].to("cpu")
            dets["masks"] = paste_soft_masks(kept[:, 0].float(), out.pred_boxes.tensor, H, W)
        return dets

    def soft_pass(self, image: np.ndarray, size: Optional[int] = None) -> Detections:
        """One pass keeping the mask probabilities.

        Returns:
            as :func:`instances_to_arrays` for :meth:`predict`, but ``masks`` are float32 ``(R, H, W)``
            probabilities (:func:`paste_soft_masks`) instead of the thresholded masks.
        """
        H, W = image.shape[:2]
        return self.soft_detections(self.inference(image, size), H, W)

    def forward(self, image: np.ndarray) -> Detections:
        """All passes over ``image`` (``(H, W, 3)``, model channel order), merged; arrays at the image's size.

        The reference pass and the shifted passes have one input size and run as one batch; each resized pass is one
        call (its own size)."""
        if not self.shifts and not self.sizes:
            return instances_to_arrays(self.predict(image))
        H, W = image.shape[:2]
        same = [image] + [shift_image(image, dy, dx) for dy, dx in self.shifts]
        found = [self.soft_detections(inst, H, W) for inst in self.inference_batch(same)]
        passes = [found[0]] + [unshift_pass(d, dy, dx) for d, (dy, dx) in zip(found[1:], self.shifts)]
        for size in self.sizes:
            passes.append(dict(self.soft_pass(image, size), **dict.fromkeys(LEARNED_KEYS)))
        return merge_tta_passes(passes)
