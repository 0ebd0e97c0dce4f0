"""The measurement's own 3-D core HU of every annotated vertebra: training data for ``TARGET "hu_correction"``.

A BMD head with ``MODEL.ROI_BMD_HEAD.TARGET "hu_correction"`` learns what to add to the HU the classical measurement
reads in a vertebra's 3-D trabecular core (``trabecular_hu_3d``) to reach the bone's own HU (the annotation's
``calibrated_hu``): the measurement's partial-volume, rim and sampling bias. Its training annotations therefore carry
``core_hu``: the value the measurement reads, measured exactly as at inference (``BMDStudyPredictor`` with the given
config: predicted masks, the same erosion, rim trim and 3-D core). :func:`annotate_core_hu` measures each study of a
prepared dataset (``annotations.json`` with ``series_dir``), matches every annotation to a measured vertebra by
mask IoU in the sagittal image (both are in the frame of the same ``make_sagittal`` parameters) and writes
``core_hu`` (None where no vertebra matched or no 3-D core was measured) back into ``annotations.json``.
"""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from bmd_d2.errors import BMDError

from .bmd_evaluator import decode_segmentation

__all__ = ["annotate_core_hu", "match_core_hu"]

logger = logging.getLogger(__name__)


def match_core_hu(annotation_masks: Sequence[np.ndarray], annotation_classes: Sequence[int], vertebrae,
                  min_iou: float = 0.5) -> List[Optional[float]]:
    """The measured 3-D core HU of each annotation: that of the measured vertebra of the same class whose sagittal
    mask overlaps it best (IoU ≥ ``min_iou``, one to one, highest IoU first); None where none does or it has no core.

    Args:
        annotation_masks: bool ``(H, W)`` each; annotation_classes: their detector classes (0 body, 1 sacrum).
        vertebrae: :class:`~bmd_d2.measure.result.VertebraResult` list (``mask``, ``category_id``,
            ``trabecular_hu_3d``).
    """
    from bmd_d2.utils.matching import mask_iou_matrix, match_greedy

    out: List[Optional[float]] = [None] * len(annotation_masks)
    if not len(annotation_masks) or not len(vertebrae):
        return out
    shape = np.shape(annotation_masks[0])
    measured = np.stack([v.mask if v.mask is not None else np.zeros(shape, bool) for v in vertebrae])
    iou = mask_iou_matrix(np.stack(annotation_masks), measured)
    iou[np.asarray(annotation_classes)[:, None] != np.array([int(v.category_id) for v in vertebrae])[None, :]] = 0.0
    for i, j in match_greedy(iou, min_iou):
        hu = vertebrae[j].trabecular_hu_3d
        out[i] = None if hu is None else round(float(hu), 3)
    return out


def _measure_images(job) -> Dict[int, List[Optional[float]]]:
    """Worker: measure the images of ``job`` with a predictor of its config; ``{image_id: [core_hu per ann]}``."""
    cfg, images, anns_by_image, min_iou, threads, log_level = job
    import torch

    if not logging.getLogger().handlers:  # a spawned worker: log as its parent does
        logging.basicConfig(level=log_level, format="%(message)s")

    from bmd_d2.measure import BMDStudyPredictor

    torch.set_num_threads(threads)
    predictor = BMDStudyPredictor(cfg)
    done = {}
    for im in images:
        anns = anns_by_image.get(im["id"], [])
        try:
            result = predictor(im["series_dir"], study_id=str(im.get("study_id") or im["id"]))
        except (BMDError, ValueError, OSError) as e:  # a study that cannot be measured keeps no core HU
            logger.warning("%s: not measured (%s)", im["series_dir"], e)
            done[im["id"]] = [None] * len(anns)
            continue
        masks = [decode_segmentation(a["segmentation"], im["height"], im["width"]) for a in anns]
        assert all(m.shape == (im["height"], im["width"]) for m in masks), im["id"]
        classes = [int(a["category_id"]) - 1 for a in anns]
        done[im["id"]] = match_core_hu(masks, classes, result.vertebrae, min_iou)
        if len(done) % 10 == 0:
            logger.info("core HU: %d of %d studies measured in this worker", len(done), len(images))
    return done


def annotate_core_hu(json_file, cfg, *, min_iou: float = 0.5, workers: int = 1) -> Dict[str, int]:
    """Write ``core_hu`` (the measurement's 3-D core HU, see the module docstring) into each annotation of
    ``json_file``; returns counts ``{"images", "annotations", "with_core"}``.

    Args:
        json_file: a prepared dataset's ``annotations.json``; its images need ``series_dir`` (the source series).
        cfg: the measuring config (model, ``INPUT.DICOM`` sagittal parameters and ``MEASURE`` as at inference).
        min_iou: least sagittal-mask IoU between an annotation and the measured vertebra it takes the value of.
        workers: processes (each builds its own predictor).

    Raises:
        BMDError: the file is missing or an image has no ``series_dir``.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise BMDError("annotations file not found", path=str(json_file))
    with open(json_file, encoding="utf-8") as f:
        coco = json.load(f)
    images = coco.get("images", [])
    for im in images:
        if not im.get("series_dir"):
            raise BMDError(f"image {im.get('id')} has no series_dir: the core HU is measured on the source series",
                           path=str(json_file))
    anns_by_image: Dict[int, List[dict]] = {}
    for a in coco.get("annotations", []):
        anns_by_image.setdefault(a["image_id"], []).append(a)
    workers = max(1, min(int(workers), len(images) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    level = logging.getLogger().getEffectiveLevel()
    jobs = [(cfg, images[k::workers], anns_by_image, float(min_iou), threads, level) for k in range(workers)]
    if workers == 1:
        parts = [_measure_images(jobs[0])]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_measure_images, jobs)
    found = {k: v for part in parts for k, v in part.items()}
    counts = {"images": len(images), "annotations": 0, "with_core": 0}
    for image_id, anns in anns_by_image.items():
        values = found.get(image_id, [None] * len(anns))
        for a, hu in zip(anns, values):
            a["core_hu"] = hu
            counts["annotations"] += 1
            counts["with_core"] += hu is not None
    tmp = json_file.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    os.replace(tmp, json_file)
    return counts
