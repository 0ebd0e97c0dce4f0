"""ROI heads: ``BMDHead`` (ROI_HEADS_REGISTRY), ``MultiScaleFusionMaskHead`` (ROI_MASK_HEAD_REGISTRY) and the BMD
branch registry ``ROI_BMD_HEAD_REGISTRY`` (default ``BMDErosionEstimator``)."""
from .bmd_head import (
    ROI_BMD_HEAD_REGISTRY,
    BMDErosionEstimator,
    BMDHead,
    build_bmd_head,
    stacked_erosion,
    truncate_mask,
)
from .fusion import MultiLevelROIPooler
from .mask_head import MultiScaleFusionMaskHead

__all__ = [
    "ROI_BMD_HEAD_REGISTRY",
    "BMDErosionEstimator",
    "BMDHead",
    "MultiLevelROIPooler",
    "MultiScaleFusionMaskHead",
    "build_bmd_head",
    "stacked_erosion",
    "truncate_mask",
]
