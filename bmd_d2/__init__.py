"""bmd_d2: vertebral bone mineral density from routine CT as a Detectron2 project.

``import bmd_d2`` registers every component in Detectron2's registries (backbone ``MFEFPN``, ROI heads ``BMDHead``,
mask head ``MultiScaleFusionMaskHead``) and exposes ``add_bmd_config``.
"""
import warnings

# Detectron2 v0.6 decorates a few helpers with torch.jit.script at import time; torch >= 2.10 warns about each one.
# The warning is about Detectron2's code, not the user's: silence exactly that message.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
# Detectron2's anchor generator calls torch.meshgrid without ``indexing=`` (its result is the "ij" one it wants).
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)

from .config import add_bmd_config, get_bmd_cfg  # noqa: E402
from .errors import BMDError  # noqa: E402
from . import modeling  # noqa: F401,E402  (registers MFEFPN, BMDHead, MultiScaleFusionMaskHead, BMDErosionEstimator)
from . import engine  # noqa: F401,E402  (alternating schedule hooks)
from . import data  # noqa: F401,E402  (registers bmd_phantoms_{train,val,test}, lazily)

from .version import __version__  # noqa: E402,F401
