"""Weights-only loading, compact export, and the weights/config consistency check."""
import os
import pickle

import pytest
import torch

from bmd_d2 import BMDError
from bmd_d2.checkpoint import BMDCheckpointer, check_weights_config, export_model, load_checkpoint_file
from bmd_d2.config import get_bmd_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    cfg = get_bmd_cfg(QUICK)
    model = build_model(cfg)
    d = tmp_path_factory.mktemp("ckpt")
    path = str(d / "model_final.pth")
    torch.save({"model": model.state_dict(), "iteration": 10}, path)
    return cfg, model, path, d


def test_export_roundtrip_fp16(trained):
    from detectron2.modeling import build_model

    cfg, model, path, d = trained
    out = export_model(path, cfg, str(d / "shipped.pth"), info={"iterations": 10})
    assert os.path.getsize(out) < 0.6 * os.path.getsize(path)  # fp16
    obj = load_checkpoint_file(out)
    assert obj["bmd_d2"]["iterations"] == 10 and "MFEFPN" in obj["bmd_d2"]["config"]
    fresh = build_model(cfg)
    BMDCheckpointer(fresh).load(out)
    for k, v in model.state_dict().items():
        w = fresh.state_dict()[k]
        assert w.dtype == v.dtype
        assert torch.allclose(w.float(), v.float(), rtol=1e-3, atol=1e-3), k
    assert check_weights_config(get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", out])) == []


def test_config_mismatch_is_named(trained):
    cfg, _, path, d = trained
    out = export_model(path, cfg, str(d / "shipped2.pth"))
    bad = get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", out, "MODEL.MFEFPN.OUT_CHANNELS", "64"])
    with pytest.raises(BMDError, match=r"MODEL\.MFEFPN\.OUT_CHANNELS: weights 32 vs config 64"):
        check_weights_config(bad)
    # test-time keys may differ
    ok = get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", out, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3"])
    assert check_weights_config(ok) == []
    # a plain training checkpoint has no stored config: reported as unchecked
    assert check_weights_config(get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", path]))


def test_keys_of_another_detectron2_version(trained, tmp_path, caplog):
    """Weights exported under one Detectron2 version, loaded under another (upstream main has keys v0.6 lacks)."""
    import yaml

    cfg, _, path, d = trained
    out = export_model(path, cfg, str(d / "shipped3.pth"))
    obj = load_checkpoint_file(out)
    stored = yaml.safe_load(obj["bmd_d2"]["config"])
    del stored["MODEL"]["ROI_HEADS"]["IOU_THRESHOLDS"]  # the weights' version had no such key
    stored["MODEL"]["ROI_BOX_HEAD"]["NEW_FEATURE_OF_ANOTHER_VERSION"] = True  # ... but had this one
    obj["bmd_d2"]["config"] = yaml.safe_dump(stored)
    other = str(tmp_path / "other_version.pth")
    torch.save(obj, other)
    with caplog.at_level("WARNING", logger="bmd_d2.checkpoint"):
        assert check_weights_config(get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", other])) == []  # config keeps the default
    assert "MODEL.ROI_BOX_HEAD.NEW_FEATURE_OF_ANOTHER_VERSION=True" in caplog.text
    changed = get_bmd_cfg(QUICK, ["MODEL.WEIGHTS", other, "MODEL.ROI_HEADS.IOU_THRESHOLDS", "[0.6]"])
    with pytest.raises(BMDError, match=r"MODEL\.ROI_HEADS\.IOU_THRESHOLDS: weights \(no such key"):
        check_weights_config(changed)


def test_code_carrying_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, str(evil))
    with pytest.raises(BMDError, match="weights-only") as e:
        load_checkpoint_file(str(evil))
    assert "\n" not in str(e.value) and str(evil) in str(e.value)
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(BMDError, match="pickle"):
        load_checkpoint_file(str(pkl))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BMDError, match="junk.pth"):
        load_checkpoint_file(str(junk))
