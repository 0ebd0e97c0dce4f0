"""Backbones: ``MFEFPN`` (registered in Detectron2's ``BACKBONE_REGISTRY`` as ``MFEFPN`` and ``build_mfe_fpn_backbone``)."""
from .mfefpn import MFEFPN, MFEModule, build_mfe_fpn_backbone

__all__ = ["MFEFPN", "MFEModule", "build_mfe_fpn_backbone"]
