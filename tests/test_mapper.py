"""BMDDatasetMapper: training/inference outputs, gt_bmd alignment, augmentations, building from series_dir."""
import numpy as np
import pytest
import torch

from _dicom_fixtures import make_dataset
from bmd_d2 import add_bmd_config
from bmd_d2.data.datasets import load_bmd_dataset, make_sagittal_params, prepare_sagittal_dataset
from bmd_d2.data.mapper import (BMDDatasetMapper, IntensityNoiseTransform, RandomResolution, ResolutionTransform,
                                build_bmd_augmentations)


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bmd_map")
    make_dataset(root, n=1, seed=7)
    return load_bmd_dataset(prepare_sagittal_dataset(root, params=make_sagittal_params(size=256))), root


def _cfg(tmp):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_bmd_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DICOM.IMAGE_SIZE = 256
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (256,), 256  # model size = image size: no resize
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 256, 256
    cfg.INPUT.DICOM.CACHE_DIR = str(tmp)
    return cfg


def test_train_outputs(dicts, tmp_path):
    ds, _ = dicts
    np.random.seed(0)
    m = BMDDatasetMapper(_cfg(tmp_path), is_train=True)
    out = m(ds[0])
    assert out["image"].shape == (3, 256, 256) and out["image"].dtype == torch.uint8
    inst = out["instances"]
    n = len(inst)
    assert n >= 3
    assert inst.gt_bmd.dtype == torch.float32 and inst.gt_bmd.shape == (n,)
    assert inst.gt_masks.tensor.shape == (n, 256, 256) and inst.gt_boxes.tensor.shape == (n, 4)
    # gt_bmd stays aligned with the level of each instance
    by_level = {a["level"]: a["bmd"] for a in ds[0]["annotations"]}
    from bmd_d2.levels import LEVELS
    for lv, b in zip(inst.gt_levels.tolist(), inst.gt_bmd.tolist()):
        assert b == pytest.approx(by_level[LEVELS[lv - 1]], rel=1e-5)
    assert set(inst.gt_classes.tolist()) <= {0, 1}
    assert "annotations" not in out and ds[0]["annotations"]  # input dict not modified


def test_inference_image_only(dicts, tmp_path):
    ds, _ = dicts
    m = BMDDatasetMapper(_cfg(tmp_path), is_train=False)
    out = m(ds[0])
    assert "instances" not in out and "annotations" not in out
    import cv2
    png = cv2.imread(ds[0]["file_name"])[..., ::-1]
    assert torch.equal(out["image"], torch.as_tensor(png.transpose(2, 0, 1).copy()))


def test_from_series_dir_uses_cache(dicts, tmp_path):
    ds, _ = dicts
    m = BMDDatasetMapper(_cfg(tmp_path), is_train=False)
    d = {"series_dir": ds[0]["series_dir"], "image_id": 1}
    a = m(d)["image"]
    files = sorted(p.name for p in tmp_path.iterdir())
    b = m(d)["image"]
    assert torch.equal(a, b) and files == sorted(p.name for p in tmp_path.iterdir()) and len(files) == 2
    assert a.shape == (3, 256, 256)


def test_intensity_transform_keeps_geometry():
    t = IntensityNoiseTransform(1.1, 5.0, 2.0, seed=1)
    img = np.full((8, 8, 3), 100, np.uint8)
    out = t.apply_image(img)
    assert out.dtype == np.uint8 and abs(out.mean() - 115) < 3
    seg = np.eye(8, dtype=np.uint8)
    assert np.array_equal(t.apply_segmentation(seg), seg)
    pts = np.array([[1.0, 2.0]])
    assert np.array_equal(t.apply_coords(pts), pts)


def test_resolution_transform_blurs_only_the_coarse_axis():
    img = np.zeros((60, 60, 3), np.uint8)
    img[:, 31:] = 200  # vertical edge: varies along x only
    out = ResolutionTransform(1.0, 3.0).apply_image(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    row = out[30, :, 0].astype(int)
    assert ((row > 10) & (row < 190)).sum() >= 2  # the x edge became a partial-volume ramp ...
    assert row[:25].max() == 0 and row[37:].min() == 200  # ... of ~3 px, not a global blur
    assert np.array_equal(out[:, :, 0], out[:, :, 2]) and (out == out[:1]).all()  # every row identical (no y blur)
    assert np.array_equal(ResolutionTransform(1.0, 1.0).apply_image(img), img)
    seg = np.eye(60, dtype=np.uint8)
    assert np.array_equal(ResolutionTransform(2.0, 3.0).apply_segmentation(seg), seg)


def test_random_resolution_probability_and_range(dicts, tmp_path):
    np.random.seed(0)
    img = np.zeros((16, 16, 3), np.uint8)
    never = [RandomResolution(0.0, 3.0).get_transform(img) for _ in range(20)]
    assert all(not isinstance(t, ResolutionTransform) for t in never)
    always = [RandomResolution(1.0, 3.0).get_transform(img) for _ in range(50)]
    f = np.array([[t.factor_y, t.factor_x] for t in always])
    assert f.min() >= 1.0 and f.max() <= 3.0 and f.std() > 0.3
    cfg = _cfg(tmp_path)
    assert any(isinstance(a, RandomResolution) for a in build_bmd_augmentations(cfg, True))
    assert not any(isinstance(a, RandomResolution) for a in build_bmd_augmentations(cfg, False))
    cfg.INPUT.BMD_AUG.RESOLUTION_PROB = 0.0
    assert not any(isinstance(a, RandomResolution) for a in build_bmd_augmentations(cfg, True))


def test_resizes_to_model_size_like_detectron2(dicts, tmp_path):
    """A small config (model at 128²) gets resized images and masks; test dicts keep the 256² height/width."""
    ds, _ = dicts
    cfg = _cfg(tmp_path)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 128
    np.random.seed(0)
    out = BMDDatasetMapper(cfg, is_train=True)(ds[0])
    assert out["image"].shape == (3, 128, 128)
    assert out["instances"].gt_masks.tensor.shape[1:] == (128, 128)
    test = BMDDatasetMapper(cfg, is_train=False)(ds[0])
    assert test["image"].shape == (3, 128, 128) and (test["height"], test["width"]) == (256, 256)
