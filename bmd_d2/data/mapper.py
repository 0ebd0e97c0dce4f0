"""``BMDDatasetMapper``: a bmd_d2 dataset dict → the model's input, following Detectron2's ``DatasetMapper``.

Image: the 3-slice sagittal PNG (``file_name``); when a dict has only ``series_dir`` (DICOM folder or NIfTI file), the
sagittal image is built once and cached by series content (``INPUT.DICOM.CACHE_DIR``). Training returns ``image``
(uint8 → float tensor (3, H, W), 0…255; normalisation by ``MODEL.PIXEL_MEAN/STD`` happens in the model) and
``instances`` with ``gt_boxes``, ``gt_classes``, ``gt_masks`` (BitMasks), ``gt_bmd`` float32 (N,) mg/cm³ and
``gt_trabecular_hu`` float32 (N,) HU: the trabecular bone's own HU (the annotation's ``calibrated_hu``, without the
cortex's partial volume; its ``trabecular_hu`` where that is unknown; NaN when both are), ``gt_core_hu`` float32
(N,) HU (the annotation's ``core_hu``: the measurement's 3-D core HU, NaN where not annotated) and ``gt_levels``
int64 (N,) (T11 = 1 … S1 = 8); inference returns ``image`` only.

Augmentations (training, ``INPUT.BMD_AUG``): random scale (``SCALE_RANGE``) with a fixed-size crop/pad back to the
image size, a small in-plane rotation (``ROTATION`` degrees), resolution randomisation (``RESOLUTION_PROB``: down- and
up-sampling per axis by up to ``RESOLUTION_MAX_MM``, as in CTs with 1.5–3 mm pixels or slices; the masks stay sharp)
and intensity scale/shift plus Gaussian noise (``gt_trabecular_hu`` and ``gt_core_hu`` follow the scale and shift:
the HU the augmented image shows, :meth:`IntensityNoiseTransform.apply_hu`). There is no
flip: a left-right flip of the *volume* would only swap channels 0 and 2, and a flip of the sagittal *image* would swap
anterior/posterior or head/feet, which never occurs in real scans. Intensity changes alter apparent HU, which the BMD
target depends on, so they are kept small (calibration varies between scanners anyway).
"""
from __future__ import annotations

import copy
import logging
import math
import os
from typing import List, Optional

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from ..errors import BMDError
from .datasets import cached_sagittal, make_sagittal_params, params_from_cfg

logger = logging.getLogger(__name__)

__all__ = ["BMDDatasetMapper", "ImageOnlyTransform", "IntensityNoiseTransform", "RandomIntensityNoise",
           "ResolutionTransform", "RandomResolution", "build_bmd_augmentations"]


class ImageOnlyTransform(Transform):
    """A transform of the image values only: coordinates and masks pass unchanged; inverting it restores nothing."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        return NoOpTransform()


class IntensityNoiseTransform(ImageOnlyTransform):
    """``img * scale + shift + N(0, noise_std)`` on the image (0…255, clipped); geometry and masks unchanged."""

    def __init__(self, scale: float, shift: float, noise_std: float, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.astype(np.float32) * self.scale + self.shift
        if self.noise_std > 0:
            out += np.random.default_rng(self.seed).normal(0.0, self.noise_std, img.shape).astype(np.float32)
        if img.dtype == np.uint8:
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out.astype(img.dtype)

    def apply_hu(self, hu, window_width: float, window_level: float):
        """The HU a value ``hu`` reads in the transformed image of a ``window_width``/``window_level`` window (the
        noise is zero-mean and clipping is ignored): ``scale · (hu - lo) + shift · width / 255 + lo``, ``lo`` the
        window's lower end. Keeps a learned-HU target true to the image the model sees."""
        lo = float(window_level) - float(window_width) / 2.0
        return self.scale * (hu - lo) + self.shift * float(window_width) / 255.0 + lo


class RandomIntensityNoise(T.Augmentation):
    """Draw an :class:`IntensityNoiseTransform`: scale ∈ 1 ± ``scale``, shift ∈ ± ``shift``, noise σ ∈ [0, ``noise_std``]."""

    def __init__(self, scale: float = 0.05, shift: float = 5.0, noise_std: float = 3.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image) -> Transform:
        s = 1.0 + np.random.uniform(-self.scale, self.scale)
        b = np.random.uniform(-self.shift, self.shift)
        n = np.random.uniform(0.0, self.noise_std)
        return IntensityNoiseTransform(s, b, n, int(np.random.randint(0, 2**31 - 1)))


class ResolutionTransform(ImageOnlyTransform):
    """Resample the image down by ``(factor_y, factor_x)`` (area averaging) and back up (bilinear) to its size.

    Imitates a coarser acquisition grid (thick slices along y = superior–inferior, coarse in-plane pixels along x =
    anterior–posterior); geometry and masks are unchanged (the anatomy, hence the truth, does not move).
    """

    def __init__(self, factor_y: float, factor_x: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        import cv2

        h, w = img.shape[:2]
        small = (max(1, int(round(w / self.factor_x))), max(1, int(round(h / self.factor_y))))
        if small == (w, h):
            return img
        out = cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
        return out.reshape(img.shape)


class RandomResolution(T.Augmentation):
    """With probability ``prob``, a :class:`ResolutionTransform` with per-axis factors uniform in [1, ``max_factor``]."""

    def __init__(self, prob: float = 0.3, max_factor: float = 3.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image) -> Transform:
        if self.prob <= 0 or self.max_factor <= 1.0 or np.random.uniform() >= self.prob:
            return NoOpTransform()
        fy, fx = np.random.uniform(1.0, self.max_factor, 2)
        return ResolutionTransform(float(fy), float(fx))


def build_bmd_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Augmentations: ``cfg.INPUT.BMD_AUG`` (training only), then Detectron2's usual resize to the model size.

    The unified ``INPUT.DICOM.IMAGE_SIZE``² sagittal image is resized with ``ResizeShortestEdge`` exactly like
    Detectron2 does (``INPUT.MIN_SIZE_TRAIN``/``MAX_SIZE_TRAIN`` in training, ``MIN_SIZE_TEST``/``MAX_SIZE_TEST`` at
    test time, the same transform ``DefaultPredictor`` applies), so a small config can run at e.g. 256² while
    predictions are reported in the 512² image's pixels (``GeneralizedRCNN`` rescales to the dict's height/width).
    """
    if not is_train:
        return [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)]
    augs: List[T.Augmentation] = []
    a = cfg.INPUT.BMD_AUG
    if a.ENABLED:
        size = int(cfg.INPUT.DICOM.IMAGE_SIZE)
        lo, hi = (float(v) for v in a.SCALE_RANGE)
        if (lo, hi) != (1.0, 1.0):
            augs += [T.ResizeScale(min_scale=lo, max_scale=hi, target_height=size, target_width=size),
                     T.FixedSizeCrop(crop_size=(size, size), pad=True, pad_value=0.0)]
        if a.ROTATION > 0:
            augs.append(T.RandomRotation([-a.ROTATION, a.ROTATION], expand=False, sample_style="range"))
        if a.RESOLUTION_PROB > 0 and a.RESOLUTION_MAX_MM > 1.0:
            augs.append(RandomResolution(float(a.RESOLUTION_PROB), float(a.RESOLUTION_MAX_MM)))
        if a.INTENSITY_SCALE > 0 or a.INTENSITY_SHIFT > 0 or a.NOISE_STD > 0:
            augs.append(RandomIntensityNoise(a.INTENSITY_SCALE, a.INTENSITY_SHIFT, a.NOISE_STD))
    augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    return augs


def _bone_hu(anno: dict) -> float:
    """The HU target of an annotation: ``calibrated_hu`` where known, else ``trabecular_hu``, else NaN."""
    for key in ("calibrated_hu", "trabecular_hu"):
        v = anno.get(key)
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return float("nan")


def _finite(value) -> float:
    """``value`` as a float, NaN when it is None or not finite."""
    return float(value) if value is not None and math.isfinite(float(value)) else float("nan")


class BMDDatasetMapper:
    """Map a bmd_d2 dataset dict to ``{"image", "instances", ...}`` (see module docstring).

    Args:
        is_train: training (annotations kept, augmentations applied) or inference (image only).
        augmentations: Detectron2 augmentations, applied to image and masks through one ``AugInput``.
        image_format: format for ``read_image`` ("RGB" keeps the PNG's channel order = sagittal channels 0, 1, 2).
        sagittal_params: :func:`make_sagittal_params` used when the image is built from ``series_dir``.
        cache_dir: cache folder for images built from ``series_dir``.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List, image_format: str = "RGB",
                 sagittal_params: Optional[dict] = None, cache_dir: str = ""):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.sagittal_params = sagittal_params or make_sagittal_params()
        self.cache_dir = cache_dir or os.path.join(os.environ.get("BMD_DATASETS", "datasets"), "cache")
        logger.info("[BMDDatasetMapper] %s augmentations: %s", "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train, "augmentations": build_bmd_augmentations(cfg, is_train),
                "image_format": cfg.INPUT.FORMAT, "sagittal_params": params_from_cfg(cfg),
                "cache_dir": cfg.INPUT.DICOM.CACHE_DIR}

    def _read(self, d: dict) -> np.ndarray:
        fn = d.get("file_name")
        if fn and os.path.isfile(fn):
            return utils.read_image(fn, format=self.image_format)
        src = d.get("series_dir")
        if not src:
            raise BMDError("dataset dict has neither a readable file_name nor series_dir", path=fn)
        png, _, _ = cached_sagittal(src, self.cache_dir, self.sagittal_params)
        return utils.read_image(str(png), format=self.image_format)

    def __call__(self, dataset_dict: dict) -> dict:
        """Args: one dataset dict (``docs/ARCHITECTURE.md``). Returns: the model's input dict."""
        d = copy.deepcopy(dataset_dict)
        image = self._read(d)
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            d.pop("annotations", None)
            return d
        annos = [utils.transform_instance_annotations(a, transforms, (h, w))
                 for a in d.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        instances = utils.annotations_to_instances(annos, (h, w), mask_format="bitmask")
        # Fields aligned with the annotations before any filtering.
        instances.gt_bmd = torch.tensor([float("nan") if a.get("bmd") is None else float(a["bmd"]) for a in annos],
                                        dtype=torch.float32)
        hu = np.array([_bone_hu(a) for a in annos], dtype=np.float64)
        core = np.array([_finite(a.get("core_hu")) for a in annos], dtype=np.float64)
        for t in transforms.transforms:  # the intensity augmentation changes the HU the image shows
            if isinstance(t, IntensityNoiseTransform):
                hu = t.apply_hu(hu, self.sagittal_params["window_width"], self.sagittal_params["window_level"])
                core = t.apply_hu(core, self.sagittal_params["window_width"], self.sagittal_params["window_level"])
        instances.gt_trabecular_hu = torch.tensor(hu, dtype=torch.float32)
        instances.gt_core_hu = torch.tensor(core, dtype=torch.float32)
        from bmd_d2.levels import LEVEL_TO_LABEL

        instances.gt_levels = torch.tensor([LEVEL_TO_LABEL.get(a.get("level") or "", 0) for a in annos],
                                           dtype=torch.int64)
        if len(annos):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()  # tight after rotation/crop
        d["instances"] = utils.filter_empty_instances(instances)
        return d
