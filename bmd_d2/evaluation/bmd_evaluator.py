"""``BMDEvaluator``: BMD agreement, ACR category accuracy, vertebra Dice and level-label accuracy on a dataset.

For every image, predictions above ``MEASURE.SCORE_THRESHOLD`` are matched one-to-one to the ground-truth vertebrae
(dataset dicts of ``DatasetCatalog``) by mask IoU ≥ ``MEASURE.EVAL_MATCH_IOU`` (greedy, highest IoU first). Matched
pairs give the BMD pairs (``pred_bmd`` vs annotation ``bmd``, mg/cm³), the Dice of the masks, the ACR category pair,
and the level pair: the predicted level comes from :func:`bmd_d2.levels.assign_levels` over all the image's
kept predictions (the labelling rule the measuring tool uses), the true one from the annotation.

Figures (``evaluate()`` returns them under ``"bmd"``; the JSON has the per-level tables and confusion matrices):
BMD MAE, RMSE, bias, Pearson r, Bland–Altman SD and 95 % limits — all, vertebral bodies only, and per level;
ACR category accuracy + confusion; mean Dice; level accuracy; detection recall/precision at the IoU threshold.
Files in ``output_dir``: ``bmd_metrics.json``, ``bmd_bland_altman.png``, ``bmd_scatter.png``.
Distributed: every rank keeps compact per-image records; ``comm.gather`` collects them on rank 0.
"""
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from bmd_d2.levels import LEVELS, VERTEBRAL_BODY_CLASS, Detection, assign_levels
from bmd_d2.measure.categories import ACR_CATEGORIES, acr_category
from bmd_d2.utils.files import json_ready

from . import metrics

logger = logging.getLogger(__name__)


def decode_segmentation(segm, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (RLE dict, possibly with str counts, or polygons) → bool ``(h, w)``."""
    from pycocotools import mask as mask_util

    if isinstance(segm, dict):
        rle = dict(segm)
        if isinstance(rle.get("counts"), list):
            rle = mask_util.frPyObjects(rle, h, w)
        elif isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        return mask_util.decode(rle).astype(bool)
    if isinstance(segm, list):
        rles = mask_util.frPyObjects(segm, h, w)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)
    return np.asarray(segm, dtype=bool)


class BMDEvaluator(DatasetEvaluator):
    """BMD / Dice / level evaluator (see the module docstring).

    Args:
        dataset_name: a registered dataset whose dicts carry ``annotations`` with ``segmentation``, ``bmd``,
            ``level``, ``category_id``.
        output_dir: folder for the JSON and PNG files (None: none written).
        score_threshold: minimum score of a prediction.
        match_iou: minimum mask IoU of a match.
        distributed: gather records from all ranks.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, *, score_threshold: float = 0.5,
                 match_iou: float = 0.5, distributed: bool = True):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.score_threshold = float(score_threshold)
        self.match_iou = float(match_iou)
        self.distributed = distributed
        self._gt: Optional[Dict] = None
        self._records: List[Dict] = []

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return cls(dataset_name, output_dir, score_threshold=cfg.MEASURE.SCORE_THRESHOLD,
                   match_iou=cfg.MEASURE.EVAL_MATCH_IOU)

    def _ground_truth(self) -> Dict:
        if self._gt is None:
            self._gt = {d["image_id"]: d for d in DatasetCatalog.get(self.dataset_name)}
        return self._gt

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        gt_index = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            gt = gt_index.get(inp["image_id"], inp)
            self._records.append(self.image_record(gt, out["instances"].to("cpu")))

    def image_record(self, gt: Dict, instances) -> Dict:
        """Compact, picklable per-image record: matched pairs and counts (no masks)."""
        h, w = int(gt.get("height") or instances.image_size[0]), int(gt.get("width") or instances.image_size[1])
        anns = [a for a in gt.get("annotations", []) if not a.get("iscrowd", 0)]
        gt_masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns else np.zeros((0, h, w), bool)
        inst = instances[instances.scores >= self.score_threshold] if len(instances) else instances
        if inst.has("pred_masks"):
            pm = inst.pred_masks.numpy().astype(bool)
        else:
            pm = np.zeros((len(inst), h, w), bool)
        if pm.shape[1:] != (h, w):
            raise ValueError(f"prediction masks {pm.shape[1:]} differ from the image size {(h, w)}")
        scores = inst.scores.numpy() if len(inst) else np.zeros(0)
        classes = inst.pred_classes.numpy() if len(inst) else np.zeros(0, int)
        boxes = inst.pred_boxes.tensor.numpy() if len(inst) else np.zeros((0, 4))
        bmd = inst.pred_bmd.numpy().reshape(-1) if inst.has("pred_bmd") else np.full(len(inst), np.nan)

        dets, det_idx = [], []
        for i in range(len(inst)):
            rows, cols = np.nonzero(pm[i])
            if rows.size == 0:
                continue
            dets.append(Detection(int(classes[i]), float(scores[i]), tuple(map(float, boxes[i])),
                                  (float(cols.mean()), float(rows.mean()))))
            det_idx.append(i)
        levels = [None] * len(inst)
        if dets:
            la = assign_levels(dets, image_shape=(h, w))
            for k, i in enumerate(det_idx):
                levels[i] = la.levels[k]

        iou = metrics.mask_iou_matrix(pm, gt_masks)
        matches = metrics.match_greedy(iou, self.match_iou)
        pairs = []
        for i, j in matches:
            a = anns[j]
            pairs.append({
                "gt_level": a.get("level"), "gt_class": int(a.get("category_id", -1)),
                "gt_bmd": float(a["bmd"]) if a.get("bmd") is not None else None,
                "pred_bmd": float(bmd[i]) if np.isfinite(bmd[i]) else None,
                "pred_level": levels[i], "pred_class": int(classes[i]),
                "dice": metrics.dice(pm[i], gt_masks[j]),
            })
        return {"image_id": gt.get("image_id"), "n_gt": len(anns), "n_pred": len(inst), "pairs": pairs}

    def evaluate(self):
        if self.distributed and comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather(self._records, dst=0)
            records = list(itertools.chain(*parts))
            if not comm.is_main_process():
                return {}
        else:
            records = self._records
        if not records:
            logger.warning("BMDEvaluator received no predictions")
            return {}
        result = summarize(records)
        self._log_table(result)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            from bmd_d2.utils.files import atomic_write_text

            atomic_write_text(os.path.join(self.output_dir, "bmd_metrics.json"),
                              json.dumps(json_ready(result), indent=2) + "\n")
            save_plots(records, self.output_dir)
        flat = OrderedDict()
        for k in ("mae", "rmse", "bias", "pearson_r", "loa_low", "loa_high"):
            flat[f"BMD_{k}"] = result["bmd_vertebrae"][k]
        flat["BMD_n"] = float(result["bmd_vertebrae"]["n"])
        flat["ACR_accuracy"] = result["acr_accuracy"]
        flat["Dice"] = result["dice_mean"]
        flat["level_accuracy"] = result["level_accuracy"]
        flat["recall"] = result["recall"]
        flat["precision"] = result["precision"]
        for lv, d in result["per_level"].items():
            flat[f"MAE_{lv}"] = d["mae"]
        return OrderedDict({"bmd": {k: (float(v) if v is not None else float("nan")) for k, v in flat.items()}})

    @staticmethod
    def _log_table(result: Dict):
        from tabulate import tabulate

        rows = [["all (vertebral bodies)", *_fmt_row(result["bmd_vertebrae"])],
                ["all (incl. sacrum)", *_fmt_row(result["bmd_all"])]]
        rows += [[lv, *_fmt_row(d)] for lv, d in result["per_level"].items()]
        # tools/train_net.py configures detectron2's loggers; use them when bmd_d2's own logger is not set up.
        log = logger if logger.isEnabledFor(logging.INFO) else logging.getLogger("detectron2.evaluation.bmd")
        table = tabulate(rows, headers=["level", "n", "MAE", "RMSE", "bias", "r", "LoA low", "LoA high", "Dice"],
                         tablefmt="pipe", floatfmt=".2f")
        log.info("BMD evaluation (mg/cm³):\n%s\nACR category accuracy %.3f | level accuracy %.3f | mean Dice "
                    "%.3f | recall %.3f | precision %.3f", table, _nan(result["acr_accuracy"]),
                    _nan(result["level_accuracy"]), _nan(result["dice_mean"]), _nan(result["recall"]),
                    _nan(result["precision"]))


def _nan(x):
    return float("nan") if x is None else x


def _fmt_row(d: Dict) -> List:
    return [d["n"], d["mae"], d["rmse"], d["bias"], d["pearson_r"], d["loa_low"], d["loa_high"], d.get("dice")]


def summarize(records: List[Dict]) -> Dict:
    """All figures from per-image records (see :meth:`BMDEvaluator.image_record`); pure, hand-checkable."""
    pairs = [p for r in records for p in r["pairs"]]
    bmd_pairs = [p for p in pairs if p["gt_bmd"] is not None and p["pred_bmd"] is not None]
    vert = [p for p in bmd_pairs if p["gt_class"] == VERTEBRAL_BODY_CLASS]

    def summ(ps):
        s = metrics.regression_summary([p["pred_bmd"] for p in ps], [p["gt_bmd"] for p in ps])
        s["dice"] = float(np.mean([p["dice"] for p in ps])) if ps else float("nan")
        return s

    per_level = OrderedDict()
    for lv in LEVELS:
        ps = [p for p in bmd_pairs if p["gt_level"] == lv]
        if ps:
            per_level[lv] = summ(ps)
    cat_pred = [acr_category(p["pred_bmd"]) for p in vert]
    cat_true = [acr_category(p["gt_bmd"]) for p in vert]
    lvl = [p for p in pairs if p["gt_level"]]
    n_gt = sum(r["n_gt"] for r in records)
    n_pred = sum(r["n_pred"] for r in records)
    return {
        "images": len(records), "gt_instances": n_gt, "predictions": n_pred, "matched": len(pairs),
        "recall": len(pairs) / n_gt if n_gt else float("nan"),
        "precision": len(pairs) / n_pred if n_pred else float("nan"),
        "bmd_all": summ(bmd_pairs), "bmd_vertebrae": summ(vert), "per_level": per_level,
        "acr_accuracy": metrics.accuracy(cat_pred, cat_true),
        "acr_confusion": {"labels": list(ACR_CATEGORIES),
                          "matrix_rows_truth": metrics.confusion_matrix(cat_pred, cat_true, ACR_CATEGORIES)},
        "dice_mean": float(np.mean([p["dice"] for p in pairs])) if pairs else float("nan"),
        "dice_vertebrae": float(np.mean([p["dice"] for p in pairs if p["gt_class"] == VERTEBRAL_BODY_CLASS]))
        if any(p["gt_class"] == VERTEBRAL_BODY_CLASS for p in pairs) else float("nan"),
        "level_accuracy": metrics.accuracy([p["pred_level"] for p in lvl], [p["gt_level"] for p in lvl]),
        "level_confusion": {"labels": list(LEVELS) + [None],
                            "matrix_rows_truth": metrics.confusion_matrix(
                                [p["pred_level"] for p in lvl], [p["gt_level"] for p in lvl],
                                list(LEVELS) + [None])},
        "class_accuracy": metrics.accuracy([p["pred_class"] for p in pairs], [p["gt_class"] for p in pairs]),
    }


def save_plots(records: List[Dict], output_dir: str):
    """Bland–Altman and scatter plots (PNG, matplotlib Agg) of the matched BMD pairs, coloured by level."""
    from matplotlib.figure import Figure

    from bmd_d2.utils.files import atomic_path

    ps = [p for r in records for p in r["pairs"] if p["gt_bmd"] is not None and p["pred_bmd"] is not None]
    t = np.array([p["gt_bmd"] for p in ps], float)
    y = np.array([p["pred_bmd"] for p in ps], float)
    lv = [p["gt_level"] or "?" for p in ps]
    ba = metrics.bland_altman(y, t)
    colors = {name: f"C{i}" for i, name in enumerate(list(LEVELS) + ["?"])}

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot(111)
    for name in colors:
        sel = [i for i, x in enumerate(lv) if x == name]
        if sel:
            ax.scatter((y[sel] + t[sel]) / 2, y[sel] - t[sel], s=12, c=colors[name], label=name)
    for val, style in ((ba["bias"], "-"), (ba["loa_low"], "--"), (ba["loa_high"], "--")):
        if np.isfinite(val):
            ax.axhline(val, color="k", linestyle=style, linewidth=1)
    ax.set_xlabel("mean of predicted and true BMD (mg/cm³)")
    ax.set_ylabel("predicted − true BMD (mg/cm³)")
    ax.set_title(f"Bland–Altman (n={ba['n']}): bias {ba['bias']:.1f}, LoA [{ba['loa_low']:.1f}, "
                 f"{ba['loa_high']:.1f}]", fontsize=9)
    if ps:
        ax.legend(fontsize=7, ncol=2)
    with atomic_path(os.path.join(output_dir, "bmd_bland_altman.png")) as tmp:
        fig.savefig(tmp, format="png")

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot(111)
    for name in colors:
        sel = [i for i, x in enumerate(lv) if x == name]
        if sel:
            ax.scatter(t[sel], y[sel], s=12, c=colors[name], label=name)
    lo = float(min(t.min(), y.min())) if ps else 0.0
    hi = float(max(t.max(), y.max())) if ps else 250.0
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1)
    ax.set_xlabel("true BMD (mg/cm³)")
    ax.set_ylabel("predicted BMD (mg/cm³)")
    r = metrics.pearson_r(y, t)
    ax.set_title(f"n={len(ps)}, r={r:.3f}, MAE={metrics.mae(y, t):.1f} mg/cm³" if ps else "no matched pairs",
                 fontsize=9)
    if ps:
        ax.legend(fontsize=7, ncol=2)
    with atomic_path(os.path.join(output_dir, "bmd_scatter.png")) as tmp:
        fig.savefig(tmp, format="png")
