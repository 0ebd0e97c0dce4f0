"""bmd_d2's network. Importing it registers ``MFEFPN``, ``BMDHead``, ``MultiScaleFusionMaskHead`` and
``BMDErosionEstimator`` in their registries. The test-time augmentation wrapper is
:mod:`bmd_d2.modeling.test_time_augmentation` (imported where it is used: it registers nothing)."""
from . import roi_heads
from .backbone import MFEFPN, build_mfe_fpn_backbone
from .roi_heads import (  # noqa: F401  (re-exported: __all__)
    ROI_BMD_HEAD_REGISTRY,
    BMDErosionEstimator,
    BMDHead,
    MultiLevelROIPooler,
    MultiScaleFusionMaskHead,
    build_bmd_head,
    stacked_erosion,
    truncate_mask,
)

__all__ = ["MFEFPN", "build_mfe_fpn_backbone", *roi_heads.__all__]
