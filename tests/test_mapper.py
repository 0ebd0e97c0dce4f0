"""BMDDatasetMapper: training/inference outputs, gt_bmd alignment, augmentations, building from series_dir."""
import numpy as np
import pytest
import torch

from _dicom_fixtures import make_dataset
from bmd_d2 import add_bmd_config
from bmd_d2.data.datasets import SagittalParams, load_bmd_dataset, prepare_sagittal_dataset
from bmd_d2.data.mapper import BMDDatasetMapper, IntensityNoiseTransform


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bmd_map")
    make_dataset(root, n=1, seed=7)
    return load_bmd_dataset(prepare_sagittal_dataset(root, params=SagittalParams(size=256))), root


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
    from bmd_d2.data.levels import LEVELS
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
