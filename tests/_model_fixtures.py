"""Tiny configs, models and synthetic batches for the network tests (CPU, seconds)."""
import os

import torch

import bmd_d2  # noqa: F401  (registers the components)
from bmd_d2.config import add_bmd_config
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANT = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")


def tiny_cfg(**overrides):
    """The instant-test config (R18, 32 channels, 128 px, CPU) with ``overrides`` given as {"A.B": value}."""
    cfg = get_cfg()
    add_bmd_config(cfg)
    cfg.merge_from_file(INSTANT)
    cfg.MODEL.DEVICE = "cpu"
    opts = []
    for k, v in overrides.items():
        opts += [k, v]
    cfg.merge_from_list(opts)
    return cfg


# (x0, y0, x1, y1, class, bmd mg/cm³, grey value 0..255) of the bright rectangles in the synthetic image
RECTS = [(16, 12, 56, 44, 0, 110.0, 90.0), (64, 56, 108, 100, 1, 180.0, 150.0), (20, 70, 52, 112, 0, 150.0, 120.0)]


def synthetic_sample(size: int = 128, rects=RECTS):
    """One training dict: bright rectangles on a dark image, with boxes, classes, bitmasks and ``gt_bmd``."""
    img = torch.full((3, size, size), 10.0)
    masks = torch.zeros((len(rects), size, size), dtype=torch.bool)
    for i, (x0, y0, x1, y1, _, _, grey) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
        img[:, y0:y1, x0:x1] = grey
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([r[:4] for r in rects], dtype=torch.float32))
    inst.gt_classes = torch.tensor([r[4] for r in rects], dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    inst.gt_bmd = torch.tensor([r[5] for r in rects], dtype=torch.float32)
    return {"image": img, "instances": inst, "height": size, "width": size}
