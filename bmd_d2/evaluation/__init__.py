"""Evaluators: Detectron2's COCO evaluation plus bmd_d2's BMD, Dice and level-label evaluators."""
from .build import build_evaluators
