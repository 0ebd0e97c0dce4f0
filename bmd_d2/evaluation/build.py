"""The evaluator set used by ``tools/train_net.py --eval-only`` and periodic evaluation."""
import os

from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from .bmd_evaluator import BMDEvaluator


def build_evaluators(cfg, dataset_name: str, output_folder=None) -> DatasetEvaluators:
    """COCO box/mask AP (pure-Python COCOeval: no compiled extension needed) plus bmd_d2's evaluators.

    Args:
        cfg: the full config.
        dataset_name: a registered dataset with annotations.
        output_folder: where evaluators write their files; default ``<OUTPUT_DIR>/inference``.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    evaluators = [COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder,
                                use_fast_impl=False)]
    if cfg.MODEL.MASK_ON:  # BMD pairs are matched by mask IoU
        evaluators.append(BMDEvaluator.from_config(cfg, dataset_name, output_folder))
    return DatasetEvaluators(evaluators)
