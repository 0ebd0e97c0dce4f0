"""The plugin is really wired into Detectron2: registries, config keys, configs, the _C fallback, error handling."""
import glob
import os
import subprocess
import sys

import pytest

import bmd_d2
from bmd_d2 import BMDError
from bmd_d2.config import get_bmd_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_import_registers_components():
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY

    assert "MFEFPN" in BACKBONE_REGISTRY
    assert "BMDHead" in ROI_HEADS_REGISTRY
    assert "MultiScaleFusionMaskHead" in ROI_MASK_HEAD_REGISTRY


def test_add_bmd_config_adds_commented_sections():
    cfg = get_bmd_cfg(freeze=False)
    assert cfg.INPUT.DICOM.WINDOW_WIDTH == 1000.0 and cfg.INPUT.DICOM.WINDOW_LEVEL == 350.0
    assert cfg.MODEL.ROI_BMD_HEAD.MASK_SOURCE in ("pred", "gt")
    assert cfg.MODEL.MFEFPN.FUSE_TYPE in ("cat", "add")
    # every key added by add_bmd_config is documented by a comment line just above it
    src = open(os.path.join(ROOT, "bmd_d2", "config.py")).read().splitlines()
    for i, line in enumerate(src):
        stripped = line.strip()
        if stripped.startswith("_C.") and "= CN()" not in stripped:
            j = i - 1
            while j >= 0 and src[j].strip().startswith("_C."):
                j -= 1
            assert src[j].strip().startswith("#"), f"config.py line {i + 1} has no comment: {stripped}"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_config_merges(path):
    cfg = get_bmd_cfg(path)
    assert cfg.MODEL.BACKBONE.NAME == "MFEFPN"
    assert cfg.MODEL.ROI_HEADS.NAME == "BMDHead"
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "MultiScaleFusionMaskHead"
    assert "://" not in cfg.MODEL.WEIGHTS  # nothing is downloaded


def test_configs_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    assert "Base-BMD-RCNN-MFEFPN.yaml" in names
    assert any(n.startswith("quick_schedules/") for n in names)


def test_bad_config_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 3\n")
    with pytest.raises(BMDError) as e:
        get_bmd_cfg(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "MODEL.NOT_A_KEY" in msg
    with pytest.raises(BMDError, match="weights file not found"):
        get_bmd_cfg("", ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    with pytest.raises(BMDError, match="config file not found"):
        get_bmd_cfg(str(tmp_path / "nope.yaml"))


def test_train_net_bad_config_exits_cleanly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  NO_SUCH: 1\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", str(bad)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr and "SOLVER.NO_SUCH" in r.stderr


def test_compiled_op_fallback_is_clear():
    from detectron2 import _C

    if not getattr(_C, "IS_BMD_D2_FALLBACK", False):
        pytest.skip("a compiled detectron2._C is installed")
    for op, words in [("nms_rotated", "rotated"), ("deform_conv_forward", "deformable"),
                      ("COCOevalAccumulate", "fast COCO evaluation")]:
        with pytest.raises(AttributeError) as e:
            getattr(_C, op)
        assert op in str(e.value) and words in str(e.value) and "compiled" in str(e.value)
    assert not hasattr(_C, "box_iou_rotated")
    assert _C.has_cuda() is False and "no compiled extension" in _C.get_compiler_version()
    # the modules that import _C at import time still import
    import detectron2.evaluation.fast_eval_api  # noqa: F401
    import detectron2.layers.deform_conv  # noqa: F401


def test_version():
    assert bmd_d2.__version__
