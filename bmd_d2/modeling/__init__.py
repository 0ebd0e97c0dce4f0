"""bmd_d2's network. Importing it registers ``MFEFPN``, ``BMDHead``, ``MultiScaleFusionMaskHead`` and
``BMDErosionEstimator`` in their registries."""
from .backbone import MFEFPN, build_mfe_fpn_backbone
from .roi_heads import (
    ROI_BMD_HEAD_REGISTRY,
    BMDErosionEstimator,
    BMDHead,
    MultiLevelROIPooler,
    MultiScaleFusionMaskHead,
    build_bmd_head,
    erode_mask,
    truncate_mask,
)

__all__ = [
    "MFEFPN",
    "build_mfe_fpn_backbone",
    "ROI_BMD_HEAD_REGISTRY",
    "BMDErosionEstimator",
    "BMDHead",
    "MultiLevelROIPooler",
    "MultiScaleFusionMaskHead",
    "build_bmd_head",
    "erode_mask",
    "truncate_mask",
]
