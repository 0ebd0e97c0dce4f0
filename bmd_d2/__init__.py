"""bmd_d2: vertebral bone mineral density from routine CT as a Detectron2 project.

``import bmd_d2`` registers every component in Detectron2's registries (backbone ``MFEFPN``, ROI heads ``BMDHead``,
mask head ``MultiScaleFusionMaskHead``) and exposes ``add_bmd_config``.
"""
from .config import add_bmd_config, get_bmd_cfg
from .errors import BMDError
from . import modeling  # noqa: F401  (registers MFEFPN, BMDHead, MultiScaleFusionMaskHead, BMDErosionEstimator)
from . import engine  # noqa: F401  (alternating schedule hooks)
from . import data  # noqa: F401  (registers bmd_phantoms_{train,val,test}, lazily)

__version__ = "0.1.0"
