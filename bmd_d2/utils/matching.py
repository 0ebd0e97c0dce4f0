"""Overlap and one-to-one matching of detections: box and mask IoU matrices, greedy matching, Dice.

NumPy only (no torch, no Detectron2), so every layer can use them: the test-time augmentation merges its passes with
:func:`box_iou` and :func:`match_greedy`, the evaluation pairs predictions with ground truth by :func:`mask_iou_matrix`
and scores the pairs with :func:`dice`.
"""
from typing import List, Tuple

import numpy as np

__all__ = ["box_iou", "mask_iou_matrix", "match_greedy", "dice"]


def _box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of every box in ``boxes1`` with every box in ``boxes2``, in float32.

    The arithmetic of Detectron2's ``pairwise_iou`` on ``Boxes`` (which hold float32): the same operations in the same
    order and precision, so the values are equal bit for bit. Intersection width and height are clamped at 0; boxes
    that do not intersect have IoU 0.

    Args:
        boxes1: ``(N, 4)`` XYXY.
        boxes2: ``(M, 4)`` XYXY.

    Returns:
        float32 ``(N, M)``.
    """
    a = np.asarray(boxes1, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float32).reshape(-1, 4)
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
    wh = np.maximum(wh, np.float32(0))
    inter = wh[..., 0] * wh[..., 1]
    union = _box_areas(a)[:, None] + _box_areas(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inter > 0, inter / union, np.float32(0))


def mask_iou_matrix(pred_masks: np.ndarray, gt_masks: np.ndarray) -> np.ndarray:
    """IoU of every predicted vs every ground-truth mask.

    Args:
        pred_masks: bool ``(P, H, W)``.
        gt_masks: bool ``(G, H, W)``.

    Returns:
        float64 ``(P, G)``.
    """
    if len(pred_masks) == 0 or len(gt_masks) == 0:  # (reshape(0, -1) of an empty array is undefined)
        return np.zeros((len(pred_masks), len(gt_masks)))
    p = np.asarray(pred_masks, dtype=bool).reshape(len(pred_masks), -1).astype(np.float64)
    g = np.asarray(gt_masks, dtype=bool).reshape(len(gt_masks), -1).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_greedy(iou: np.ndarray, threshold: float = 0.5) -> List[Tuple[int, int]]:
    """One-to-one matching of predictions to ground truth by descending IoU (ties: lower indices first).

    Args:
        iou: ``(P, G)`` overlaps.
        threshold: minimum IoU of a match.

    Returns:
        list of ``(pred_index, gt_index)`` pairs, sorted by ``gt_index``.
    """
    iou = np.asarray(iou, dtype=np.float64)
    pairs = [(float(iou[i, j]), i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])
             if iou[i, j] >= threshold]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    used_p, used_g, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            out.append((i, j))
    return sorted(out, key=lambda x: x[1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two boolean masks of equal shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0
