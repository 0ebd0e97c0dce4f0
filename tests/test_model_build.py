"""Every config builds the full model through the registries; a few SGD iterations lower the losses."""
import glob
import os

import pytest
import torch

from _model_fixtures import ROOT, synthetic_sample, tiny_cfg
from bmd_d2.config import add_bmd_config
from bmd_d2.modeling import MFEFPN, BMDErosionEstimator, BMDHead, MultiScaleFusionMaskHead
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_exist():
    names = {os.path.relpath(c, os.path.join(ROOT, "configs")) for c in CONFIGS}
    assert {"Base-BMD-RCNN-MFEFPN.yaml", "bmd_rcnn_MFEFPN_R50_512.yaml", "bmd_rcnn_MFEFPN_R18_cpu.yaml",
            "quick_schedules/bmd_rcnn_MFEFPN_instant_test.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_builds_model(path):
    cfg = get_cfg()
    add_bmd_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    # no downloads: training configs start from scratch; the shipped default names a file in the repository
    assert cfg.MODEL.WEIGHTS == "" or os.path.isfile(os.path.join(ROOT, cfg.MODEL.WEIGHTS))
    model = build_model(cfg)
    assert isinstance(model.backbone, MFEFPN)
    assert isinstance(model.roi_heads, BMDHead)
    assert isinstance(model.roi_heads.mask_head, MultiScaleFusionMaskHead)
    assert isinstance(model.roi_heads.bmd_head, BMDErosionEstimator)
    assert model.backbone.output_shape()["p6"].stride == 64
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.NORM in ("GN", "BN", "SyncBN")
    assert all(p.requires_grad for p in model.parameters())  # from scratch: nothing frozen


def test_few_sgd_iterations_lower_the_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.ROI_BMD_HEAD.MASK_SOURCE": "gt"})
    model = build_model(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = [synthetic_sample(), synthetic_sample()]
    history = []
    with EventStorage(0):
        for _ in range(15):
            losses = model(batch)
            total = sum(losses.values())
            assert torch.isfinite(total)
            history.append({k: float(v.detach()) for k, v in losses.items()})
            opt.zero_grad()
            total.backward()
            opt.step()
    first = sum(history[0].values())
    last = sum(sum(h.values()) for h in history[-3:]) / 3
    assert last < 0.8 * first, (first, last, history[-1])
    assert sum(h["loss_bmd"] for h in history[-3:]) / 3 < history[0]["loss_bmd"]
