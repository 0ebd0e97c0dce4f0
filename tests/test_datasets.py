"""Sagittal dataset preparation (cache), COCO annotations and lazy Detectron2 registration."""
import json
import os

import numpy as np
import pytest

from _dicom_fixtures import make_dataset
from bmd_d2.data.datasets import (load_bmd_dataset, make_sagittal_params, prepare_sagittal_dataset, read_bmd_csv,
                                  register_all_bmd_datasets, register_bmd_dataset, register_datasets_by_name)
from bmd_d2.errors import BMDError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bmd_ds")
    ids = make_dataset(root, n=2, seed=0)
    return root, ids


def test_prepare_builds_and_caches(dataset, caplog):
    root, ids = dataset
    params = make_sagittal_params(size=256)
    j = prepare_sagittal_dataset(root, params=params)
    coco = json.load(open(j))
    assert [im["study_id"] for im in coco["images"]] == list(ids)
    assert {c["name"] for c in coco["categories"]} == {"vertebral_body", "sacrum"}
    bmd = read_bmd_csv(root / "bmd.csv")
    for a in coco["annotations"]:
        sid = coco["images"][a["image_id"] - 1]["study_id"]
        assert a["bmd"] == pytest.approx(bmd[sid][a["level"]]["bmd"])
        assert a["category_id"] == (2 if a["level"] == "S1" else 1)
        assert isinstance(a["segmentation"]["counts"], str) and a["area"] > 0
    for sid in ids:
        assert (root / "sagittal" / f"{sid}.png").is_file()
        with np.load(root / "sagittal" / f"{sid}.npz") as z:
            assert z["hu"].shape == (3, 256, 256) and z["transform"].shape == (4, 4) and "labels" in z.files
    mtimes = [os.path.getmtime(root / "sagittal" / f"{sid}.npz") for sid in ids]
    caplog.set_level("INFO")
    prepare_sagittal_dataset(root, params=params)
    assert mtimes == [os.path.getmtime(root / "sagittal" / f"{sid}.npz") for sid in ids]
    assert "0 rebuilt" in caplog.text


def test_dataset_dicts(dataset):
    root, ids = dataset
    dicts = load_bmd_dataset(root / "annotations.json")
    d = dicts[0]
    assert os.path.isfile(d["file_name"]) and d["height"] == d["width"]
    assert d["series_dir"] and d["study_id"] == ids[0]
    a = d["annotations"][0]
    assert set(a) >= {"bbox", "bbox_mode", "segmentation", "category_id", "level", "bmd", "trabecular_hu",
                      "calibrated_hu"}
    assert a["category_id"] in (0, 1)


def test_lazy_registration(tmp_path, dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_bmd_dataset("bmd_test_missing_xyz", tmp_path / "nothing")  # no scan at registration
    with pytest.raises(BMDError):
        DatasetCatalog.get("bmd_test_missing_xyz")
    root, _ = dataset
    register_bmd_dataset("bmd_test_ds_xyz", root, params=make_sagittal_params(size=256))
    assert len(DatasetCatalog.get("bmd_test_ds_xyz")) == 2
    md = MetadataCatalog.get("bmd_test_ds_xyz")
    assert md.thing_classes == ["vertebral_body", "sacrum"] and md.levels[0] == "T11"
    assert md.json_file.endswith("annotations.json") and md.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    register_all_bmd_datasets(str(tmp_path))  # idempotent, no scanning
    assert "bmd_phantoms_train" in DatasetCatalog.list()


def test_register_by_name_only_dataset_folders(tmp_path, dataset):
    """Config dataset names that are standard-layout folders under the root get registered (a mix of datasets for
    training); registered names are left alone; other names are left for Detectron2's own KeyError."""
    import shutil

    from detectron2.data import DatasetCatalog

    root, ids = dataset
    prepare_sagittal_dataset(root, params=make_sagittal_params(size=256))
    shutil.copytree(root, tmp_path / "bmd_mix_a_xyz")
    (tmp_path / "not_a_dataset_xyz").mkdir()
    names = ["bmd_mix_a_xyz", "not_a_dataset_xyz", "bmd_phantoms_train", "nowhere_xyz"]
    assert register_datasets_by_name(names, str(tmp_path)) == ["bmd_mix_a_xyz"]
    assert [d["study_id"] for d in DatasetCatalog.get("bmd_mix_a_xyz")] == list(ids)
    assert "not_a_dataset_xyz" not in DatasetCatalog.list() and "nowhere_xyz" not in DatasetCatalog.list()
    assert register_datasets_by_name(names, str(tmp_path)) == []  # idempotent


def test_calibrated_hu_is_read_when_present_and_nan_in_old_tables(tmp_path):
    """bmd.csv's calibrated_hu column (the trabecular bone's HU without the cortex's partial volume) reaches the
    annotations and the HU target; a table written before it reads NaN there and the target falls back."""
    from bmd_d2.data.mapper import _bone_hu
    from bmd_d2.phantoms.writers import write_bmd_csv

    write_bmd_csv(tmp_path / "new.csv", [dict(study_id="s", level="L1", bmd_mg_cm3=100.0, trabecular_hu=108.2,
                                              calibrated_hu=99.6),
                                         dict(study_id="s", level="L2", bmd_mg_cm3=90.0, trabecular_hu=95.0)])
    rows = read_bmd_csv(tmp_path / "new.csv")["s"]
    assert rows["L1"]["calibrated_hu"] == pytest.approx(99.6) and np.isnan(rows["L2"]["calibrated_hu"])
    (tmp_path / "old.csv").write_text("study_id,level,bmd_mg_cm3,trabecular_hu\ns,L1,100,108.2\n")
    old = read_bmd_csv(tmp_path / "old.csv")["s"]["L1"]
    assert old["trabecular_hu"] == pytest.approx(108.2) and np.isnan(old["calibrated_hu"])
    assert _bone_hu({"calibrated_hu": 99.6, "trabecular_hu": 108.2}) == pytest.approx(99.6)
    assert _bone_hu({"calibrated_hu": float("nan"), "trabecular_hu": 108.2}) == pytest.approx(108.2)
    assert np.isnan(_bone_hu({"calibrated_hu": None, "trabecular_hu": None}))


def test_bad_csv(tmp_path):
    (tmp_path / "b.csv").write_text("study_id,level,bmd_mg_cm3\ns,L9,100\n")
    with pytest.raises(BMDError) as ex:
        read_bmd_csv(tmp_path / "b.csv")
    assert "L9" in str(ex.value)


def test_prepare_with_workers_matches_serial(tmp_path):
    """Building the caches in worker processes gives the same dataset as one process."""
    import json as _json

    from bmd_d2.data.datasets import make_sagittal_params, prepare_sagittal_dataset
    from bmd_d2.phantoms import PhantomOptions, generate_dataset

    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        generate_dataset(root, 2, seed=7, options=PhantomOptions.tiny(preview=False), progress=False)
    ja = _json.loads(prepare_sagittal_dataset(a, params=make_sagittal_params(size=128)).read_text())
    jb = _json.loads(prepare_sagittal_dataset(b, params=make_sagittal_params(size=128), workers=2).read_text())
    assert len(ja["annotations"]) == len(jb["annotations"]) > 0
    for x, y in zip(ja["annotations"], jb["annotations"]):
        assert x["bbox"] == y["bbox"] and x["level"] == y["level"] and x["bmd"] == y["bmd"]


def test_mapper_hu_target_follows_the_intensity_augmentation(dataset):
    """gt_trabecular_hu is the HU the augmented image shows: the intensity scale/shift applied to the image (fitted
    back from the pixels here) moves the target exactly as it moves the window's HU."""
    from detectron2.data import detection_utils as utils

    from bmd_d2.data.mapper import BMDDatasetMapper, RandomIntensityNoise, _bone_hu

    root, _ = dataset
    params = make_sagittal_params(size=256)
    d = load_bmd_dataset(prepare_sagittal_dataset(root, params=params))[0]  # cached after the first test
    mapper = BMDDatasetMapper(True, augmentations=[RandomIntensityNoise(0.1, 10.0, 0.0)], sagittal_params=params)
    np.random.seed(3)
    out = mapper(d)
    before = utils.read_image(d["file_name"], format="RGB").astype(np.float64)
    after = out["image"].numpy().transpose(1, 2, 0).astype(np.float64)
    inside = (before > 20) & (before < 200)  # away from clipping
    scale, shift = np.polyfit(before[inside], after[inside], 1)
    assert abs(scale - 1.0) > 1e-3 or abs(shift) > 0.5  # the draw did change the image
    lo, width = params["window_level"] - params["window_width"] / 2, params["window_width"]
    want = [scale * (_bone_hu(a) - lo) + shift * width / 255.0 + lo for a in d["annotations"]]
    got = out["instances"].gt_trabecular_hu.numpy()
    assert len(got) == len(want) and np.allclose(got, want, atol=1.0)  # 1 HU = 0.26 grey levels: the fit's rounding
    plain = BMDDatasetMapper(True, augmentations=[], sagittal_params=params)(d)
    assert np.allclose(plain["instances"].gt_trabecular_hu.numpy(), [_bone_hu(a) for a in d["annotations"]])


def test_mapper_core_hu_follows_the_intensity_augmentation_like_the_target(dataset):
    """An annotation's measured ``core_hu`` reaches the instances as ``gt_core_hu``, moved by the intensity
    augmentation exactly as ``gt_trabecular_hu`` (their difference only scales); NaN where not annotated."""
    from bmd_d2.data.mapper import BMDDatasetMapper, RandomIntensityNoise, _bone_hu

    root, _ = dataset
    params = make_sagittal_params(size=256)
    d = load_bmd_dataset(prepare_sagittal_dataset(root, params=params))[0]
    assert all(np.isnan(a["core_hu"]) for a in d["annotations"])  # not annotated yet
    plain = BMDDatasetMapper(True, augmentations=[], sagittal_params=params)(d)
    assert np.isnan(plain["instances"].gt_core_hu.numpy()).all()
    for k, a in enumerate(d["annotations"]):
        a["core_hu"] = _bone_hu(a) + 4.0 + k
    plain = BMDDatasetMapper(True, augmentations=[], sagittal_params=params)(d)
    np.testing.assert_allclose(plain["instances"].gt_core_hu.numpy(), [a["core_hu"] for a in d["annotations"]],
                               atol=1e-3)
    mapper = BMDDatasetMapper(True, augmentations=[RandomIntensityNoise(0.1, 10.0, 0.0)], sagittal_params=params)
    np.random.seed(3)
    out = mapper(d)
    hu, core = out["instances"].gt_trabecular_hu.numpy(), out["instances"].gt_core_hu.numpy()
    raw = np.array([a["core_hu"] - _bone_hu(a) for a in d["annotations"]])
    ratio = (core - hu) / raw
    assert np.allclose(ratio, ratio[0], atol=1e-3) and abs(ratio[0] - 1.0) > 1e-3  # the same scale, not 1
