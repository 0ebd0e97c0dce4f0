#!/usr/bin/env python
"""Train and evaluate bmd_d2 models with Detectron2's trainer.

    python tools/train_net.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml
    python tools/train_net.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml --eval-only MODEL.WEIGHTS path.pth
    python tools/train_net.py --config-file ... --num-gpus 8        # or --num-machines/--machine-rank/--dist-url

All library logic lives in ``bmd_d2``; this file only wires it into ``DefaultTrainer``.
"""
import logging
import sys

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch

import bmd_d2  # noqa: F401  (registers the project's components)
from bmd_d2 import BMDError
from bmd_d2.checkpoint import BMDCheckpointer
from bmd_d2.config import get_bmd_cfg
from bmd_d2.data import BMDDatasetMapper
from bmd_d2.data.datasets import register_datasets_by_name
from bmd_d2.engine import build_schedule_hooks
from bmd_d2.evaluation import build_evaluators

logger = logging.getLogger("bmd_d2.train_net")


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with bmd_d2's DICOM/sagittal mapper, evaluators and training-schedule hooks."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=BMDDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=BMDDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluators(cfg, dataset_name, output_folder)

    def build_hooks(self):
        hooks = super().build_hooks()
        # Schedule hooks run before the others so a step's freezing applies from its first iteration.
        return build_schedule_hooks(self.cfg) + hooks


def setup(args):
    cfg = get_bmd_cfg(args.config_file, args.opts)  # BMDError on a bad file, key or weights path
    # dataset folders under $BMD_DATASETS named in the config (beyond bmd_phantoms_{train,val,test})
    register_datasets_by_name(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        BMDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli():
    args = default_argument_parser().parse_args()
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
