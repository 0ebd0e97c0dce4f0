"""Parameter counts and FLOPs (fvcore) of a bmd_d2 model config, behind ``tools/model_stats.py``.

FLOPs are fvcore's (one fused multiply-add = 1 flop) for one square image at the config's test size, in eval mode.
The backbone figure is exact; the full-model figure runs with ``SCORE_THRESH_TEST = 0`` so the box branch sees
``POST_NMS_TOPK_TEST`` proposals and the mask/BMD branches ``DETECTIONS_PER_IMAGE`` detections (the worst case of an
untrained model). ROIAlign and NMS are not counted.
"""
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["model_stats", "TABLE_HEADER", "format_row"]

TABLE_HEADER = ("| config | input | params (M): total / backbone / RPN / box / mask / BMD | GFLOPs: backbone / RPN / "
                "ROI heads / total |\n|---|---|---|---|")


class _TensorsInOut(torch.nn.Module):
    """Image tensor ``(3, H, W)`` → tuple of output tensors, so fvcore's jit tracer can follow the model.
    (``detectron2.utils.analysis`` does the same through ``detectron2.export``, which needs caffe2 on v0.6.)"""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        h, w = image.shape[-2:]
        inst = self.model([{"image": image, "height": h, "width": w}])[0]["instances"]
        out = [inst.pred_boxes.tensor, inst.scores]
        out += [getattr(inst, f) for f in ("pred_masks", "pred_bmd") if inst.has(f)]
        return tuple(out)


def model_stats(config_file: str, size: int = 0, root: str = os.curdir) -> dict:
    """Parameter counts (total and per part) and GFLOPs of the model of ``config_file`` on a ``size``² image.

    Args:
        config_file: model config.
        size: image side (0: the config's ``INPUT.MIN_SIZE_TEST``).
        root: the report names the config relative to this folder.

    Returns:
        ``config``, ``size``, ``params`` (counts: total, backbone, rpn, box, mask, bmd), ``gflops`` (backbone,
        total, rpn, roi_heads), ``proposals`` and ``detections``.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from fvcore.nn import FlopCountAnalysis as FvcoreFlops
    from fvcore.nn import parameter_count

    from bmd_d2.config import add_bmd_config

    importlib.import_module("bmd_d2.modeling")  # registers MFEFPN, BMDHead, MultiScaleFusionMaskHead, ...

    cfg = get_cfg()
    add_bmd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    size = size or cfg.INPUT.MIN_SIZE_TEST
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    counts = parameter_count(model)
    heads = model.roi_heads
    params = {
        "total": counts[""],
        "backbone": counts["backbone"],
        "rpn": counts["proposal_generator"],
        "box": counts["roi_heads.box_head"] + counts["roi_heads.box_predictor"],
        "mask": counts.get("roi_heads.mask_head", 0),
        "bmd": counts.get("roi_heads.bmd_head", 0) if getattr(heads, "bmd_on", False) else 0,
    }
    image = torch.rand(3, size, size) * 255
    with torch.no_grad():
        bb = FvcoreFlops(model.backbone, (image[None] - model.pixel_mean) / model.pixel_std)
        bb.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        full = FvcoreFlops(_TensorsInOut(model), (image,))
        full.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = full.by_module()
        gflops = {
            "backbone": bb.total() / 1e9,
            "total": full.total() / 1e9,
            "rpn": by_module.get("model.proposal_generator", 0) / 1e9,
            "roi_heads": by_module.get("model.roi_heads", 0) / 1e9,
        }
    return {"config": os.path.relpath(config_file, root), "size": size, "params": params, "gflops": gflops,
            "proposals": cfg.MODEL.RPN.POST_NMS_TOPK_TEST, "detections": cfg.TEST.DETECTIONS_PER_IMAGE}


def format_row(s: dict) -> str:
    """One Markdown table row (under :data:`TABLE_HEADER`) of a :func:`model_stats` report: millions of parameters and
    GFLOPs."""
    p = {k: v / 1e6 for k, v in s["params"].items()}
    g = s["gflops"]
    return (f"| {s['config']} | {s['size']}² | {p['total']:.2f} / {p['backbone']:.2f} / {p['rpn']:.2f} / "
            f"{p['box']:.2f} / {p['mask']:.2f} / {p['bmd']:.2f} | {g['backbone']:.2f} / {g['rpn']:.2f} / "
            f"{g['roi_heads']:.2f} / {g['total']:.2f} |")
