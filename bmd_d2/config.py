"""``add_bmd_config``: every config key bmd_d2 adds to Detectron2's, with its default and meaning.

Call it on a fresh ``get_cfg()`` before ``merge_from_file`` (yacs rejects unknown keys). Units: HU for CT numbers,
mg/cm³ for bone mineral density, mm for lengths.
"""
import copy
import logging
import math
import os
from typing import Optional

from detectron2.config import CfgNode as CN

from .errors import BMDError, one_line

logger = logging.getLogger(__name__)


def add_bmd_config(cfg):
    """Add bmd_d2's keys (``MODEL.MFEFPN``, ``MODEL.ROI_BMD_HEAD``, ``INPUT.DICOM``, ...) to ``cfg`` in place."""
    _C = cfg

    # ---------------------------------------------------------------------------------------------------------------
    # MFEFPN backbone: ResNet bottom-up + multi-scale feature enhancement (MFE) + dense top-down pathway.
    # ---------------------------------------------------------------------------------------------------------------
    _C.MODEL.MFEFPN = CN()
    # ResNet stages fed to the MFE modules (C2..C5). C1 (the stem) is taken as well, for MFE(2).
    _C.MODEL.MFEFPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Channels of every output level p2..p6.
    _C.MODEL.MFEFPN.OUT_CHANNELS = 256
    # Norm in the MFE and top-down convs: "" (none), "GN", "BN", "SyncBN".
    _C.MODEL.MFEFPN.NORM = ""
    # How MFE(i) merges C(i-1), C(i), C(i+1): "cat" (concatenate, then 1x1) or "add" (element-wise sum).
    _C.MODEL.MFEFPN.FUSE_TYPE = "cat"
    # 2x downsampling of C(i-1) in MFE(i): "pool" (2x2 max pool) or "conv" (3x3 stride-2 conv).
    _C.MODEL.MFEFPN.DOWNSAMPLE = "pool"
    # Dense top-down: P(i) uses up2(P(i+1)) and up4(P(i+2)); False uses only up2(P(i+1)).
    _C.MODEL.MFEFPN.DENSE_TOP_DOWN = True
    # P6 from P5: "pool" (stride-2 max pool) or "conv" (3x3 stride-2 conv).
    _C.MODEL.MFEFPN.P6_DOWNSAMPLE = "pool"

    # ---------------------------------------------------------------------------------------------------------------
    # Multi-scale fusion ROI heads (ROI_HEADS.NAME = "BMDHead").
    # ---------------------------------------------------------------------------------------------------------------
    _C.MODEL.ROI_FUSION = CN()
    # Every proposal is ROIAligned on ALL levels of MODEL.ROI_HEADS.IN_FEATURES (p2..p6), not one level per box.
    # Box branch: ROI_BOX_HEAD.POOLER_RESOLUTION (7) on every level, summed.
    # Mask branch: one pooled size per ROI_HEADS.IN_FEATURES level; equal sizes are max-fused, then fused coarse to
    # fine (3x3 conv + 2x up + add): P2,P3 -> 56, P4,P5 -> 28, P6 -> 14 gives fused 56x56 features.
    _C.MODEL.ROI_FUSION.MASK_POOLER_RESOLUTIONS = [56, 56, 28, 28, 14]
    # Bilinear upsampling of the mask logits after the conv module (3x3, 1x1): 2 -> 112x112 masks. The BMD branch
    # averages the probabilities back to the fused size (56) before truncation.
    _C.MODEL.ROI_FUSION.MASK_UPSAMPLE_FACTOR = 2

    # ---------------------------------------------------------------------------------------------------------------
    # BMD branch: truncation -> stacked erosion -> masked fused features -> estimator.
    # ---------------------------------------------------------------------------------------------------------------
    _C.MODEL.BMD_ON = True
    _C.MODEL.ROI_BMD_HEAD = CN()
    # Estimator registered in bmd_d2's ROI_BMD_HEAD_REGISTRY.
    _C.MODEL.ROI_BMD_HEAD.NAME = "BMDErosionEstimator"
    # Truncation threshold on mask probability -> binary mask.
    _C.MODEL.ROI_BMD_HEAD.MASK_THRESHOLD = 0.5
    # Number K of stacked 3x3 stride-1 min-pool erosions (each removes one 56x56-grid pixel of border; outside the
    # ROI counts as background; objects thinner than 2K+1 pixels vanish).
    _C.MODEL.ROI_BMD_HEAD.EROSION_ITERS = 3
    # Estimator: 3x3 conv (CONV_DIM channels) -> average pool to POOL_SIZE^2 -> flatten -> NUM_FC hidden FC layers of
    # FC_DIM units (+ReLU) -> FC -> 1 (method: "3x3 conv, flatten, FC, FC->1", i.e. NUM_FC = 1).
    _C.MODEL.ROI_BMD_HEAD.CONV_DIM = 64
    _C.MODEL.ROI_BMD_HEAD.FC_DIM = 1024
    _C.MODEL.ROI_BMD_HEAD.NUM_FC = 1
    # Spatial size the masked features are pooled to before flattening (56 keeps full resolution).
    _C.MODEL.ROI_BMD_HEAD.POOL_SIZE = 14
    # What the estimator learns: "bmd" (the vertebra's BMD, mg/cm³: blind to the scanner's HU <-> BMD line) or "hu"
    # (its trabecular CT number, HU, which the measurement converts with the study's calibration: MEASURE.CALIBRATION)
    # or "hu_correction" (HU to add to the measured 3-D core HU: the measurement's partial-volume, rim and sampling
    # bias; trained on datasets whose annotations carry the measured "core_hu", tools/annotate_core_hu.py).
    _C.MODEL.ROI_BMD_HEAD.TARGET = "bmd"
    # Also feed the estimator's FC layers the eroded ROI's mean input intensity per image channel and its area share
    # of the ROI grid (ROIAligned from the normalised input image): the fused features are detection features that
    # carry no calibrated intensity, which a HU target needs. Changes the FC's input size: weights trained without it
    # do not load into a head with it (and the other way round).
    _C.MODEL.ROI_BMD_HEAD.INTENSITY_INPUT = False
    # Targets are normalised as (value - MEAN) / STD (mg/cm³, or HU for TARGET "hu") for the loss; predictions are
    # de-normalised.
    _C.MODEL.ROI_BMD_HEAD.BMD_MEAN, _C.MODEL.ROI_BMD_HEAD.BMD_STD = 140.0, 50.0
    # "smooth_l1" or "l1" on normalised targets.
    _C.MODEL.ROI_BMD_HEAD.LOSS_TYPE = "smooth_l1"
    _C.MODEL.ROI_BMD_HEAD.SMOOTH_L1_BETA = 0.1
    _C.MODEL.ROI_BMD_HEAD.LOSS_WEIGHT = 1.0
    # Mask fed to the BMD branch in training: "pred" (method's mode 1) or "gt" (mode 2). Inference always uses pred.
    _C.MODEL.ROI_BMD_HEAD.MASK_SOURCE = "gt"

    # ---------------------------------------------------------------------------------------------------------------
    # Training schedule.
    # ---------------------------------------------------------------------------------------------------------------
    _C.SOLVER.ALTERNATING = CN()
    # "joint" (end-to-end), "alternating" (4 steps: RPN; heads; RPN with frozen backbone; heads with frozen
    # backbone) or "bmd_head" (the BMD branch alone, everything else frozen: e.g. a new ROI_BMD_HEAD.TARGET on top of
    # trained weights). STEP_ITERS are the iteration counts of the 4 steps (their sum should equal SOLVER.MAX_ITER).
    _C.SOLVER.ALTERNATING.MODE = "joint"
    # Step i runs from sum(STEP_ITERS[:i]) to sum(STEP_ITERS[:i+1]); iterations after the sum stay in step 4.
    # A step freezes parameters (requires_grad=False: no update, no weight decay, no momentum) and detaches the
    # losses of the frozen part: 1 RPN+backbone (heads frozen, head losses off); 2 heads+backbone (RPN frozen, RPN
    # losses off); 3 RPN only (backbone and heads frozen); 4 heads only (backbone and RPN frozen).
    _C.SOLVER.ALTERNATING.STEP_ITERS = [0, 0, 0, 0]

    # ---------------------------------------------------------------------------------------------------------------
    # DICOM/NIfTI input -> 3-slice sagittal image.
    # ---------------------------------------------------------------------------------------------------------------
    _C.INPUT.DICOM = CN()
    # CT window (HU): width 1000, level 350 maps -150..850 HU to 0..255.
    _C.INPUT.DICOM.WINDOW_WIDTH, _C.INPUT.DICOM.WINDOW_LEVEL = 1000.0, 350.0
    # In-plane pixel size (mm) of the resampled sagittal image; also the distance between the 3 slices.
    _C.INPUT.DICOM.SAGITTAL_SPACING = 1.0
    # Side of the square model image (pixels): centre crop / zero pad to it, never cutting a vertebra off.
    _C.INPUT.DICOM.IMAGE_SIZE = 512
    # Number of consecutive sagittal slices stacked as channels (the mid-sagittal plane in the middle).
    _C.INPUT.DICOM.NUM_SLICES = 3
    # When a folder holds several CT series: "" picks by the documented rule (most slices); else the
    # SeriesInstanceUID to use.
    _C.INPUT.DICOM.SERIES_UID = ""
    # Folder for cached sagittal images (keyed by series content); "" = <dataset root>/cache.
    _C.INPUT.DICOM.CACHE_DIR = ""

    # Training-time augmentation of sagittal images.
    _C.INPUT.BMD_AUG = CN()
    _C.INPUT.BMD_AUG.ENABLED = True
    # Random rotation range (degrees) in the sagittal plane.
    _C.INPUT.BMD_AUG.ROTATION = 5.0
    # Random isotropic scale range, then a fixed-size crop/pad back to IMAGE_SIZE; (1.0, 1.0) disables it.
    _C.INPUT.BMD_AUG.SCALE_RANGE = (0.85, 1.15)
    # Random intensity scale/offset on the 0..255 image and additive Gaussian noise std (0..255 units).
    _C.INPUT.BMD_AUG.INTENSITY_SCALE = 0.05
    _C.INPUT.BMD_AUG.INTENSITY_SHIFT = 5.0
    _C.INPUT.BMD_AUG.NOISE_STD = 3.0
    # Resolution randomisation: with this probability the image is resampled down and back up, independently per
    # axis, by a factor drawn from [1, RESOLUTION_MAX_MM] (the sagittal image has 1 mm pixels), imitating coarse
    # in-plane pixels (AP axis) and thick slices (SI axis) up to 3 mm. Masks stay sharp. 0 disables it.
    _C.INPUT.BMD_AUG.RESOLUTION_PROB = 0.3
    _C.INPUT.BMD_AUG.RESOLUTION_MAX_MM = 3.0

    add_measure_config(_C)
    return cfg


class _Number:
    """A real number (not a bool): finite unless ``finite`` is False, optionally an integer, within ``lo``..``hi``."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, *, integer: bool = False,
                 finite: bool = True):
        self.lo, self.hi, self.integer, self.finite = lo, hi, integer, finite

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {self.lo:g}..{self.hi:g}"
        if self.lo is not None:
            return f"{kind} >= {self.lo:g}"
        return f"a finite {kind[2:] if self.integer else 'number'}" if self.finite else kind

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        in_range = (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        return (math.isfinite(value) or not self.finite) and in_range

    def error(self, key: str, value) -> Optional[str]:
        return None if self.ok(value) else f"MEASURE.{key} must be {self.describe()}, not {value!r}"


class _Ascending(_Number):
    """A list of ``length`` numbers in strictly ascending order, each as :class:`_Number` checks."""

    def __init__(self, length: int, lo: Optional[float] = None, hi: Optional[float] = None):
        super().__init__(lo, hi)
        self.length = length

    def error(self, key: str, value) -> Optional[str]:
        items = list(value) if isinstance(value, (list, tuple)) else None
        if (items is not None and len(items) == self.length and all(self.ok(v) for v in items)
                and all(a < b for a, b in zip(items, items[1:]))):
            return None
        return (f"MEASURE.{key} must be {self.length} ascending numbers ({self.describe()} each), "
                f"not {value!r}")


class _Choice:
    """One of ``options``; ``show_value`` appends the bad value to the message."""

    def __init__(self, *options: str, show_value: bool = True):
        self.options, self.show_value = options, show_value

    def error(self, key: str, value) -> Optional[str]:
        if value in self.options:
            return None
        msg = f"MEASURE.{key} must be " + " or ".join(repr(o) for o in self.options)
        return f"{msg}, not {value!r}" if self.show_value else msg


class _Flag:
    """``True`` or ``False``."""

    def error(self, key: str, value) -> Optional[str]:
        return None if isinstance(value, bool) else f"MEASURE.{key} must be True or False, not {value!r}"


class _ReadableFile:
    """"" (none) or the path of a file that can be opened (its content is parsed by its user)."""

    def error(self, key: str, value) -> Optional[str]:
        return None if isinstance(value, str) else f"MEASURE.{key} must be a file path, not {value!r}"


class _Unchecked:
    """Checked where the value is parsed (``MEASURE.TTA_*``: ``bmd_d2.modeling.test_time_augmentation.parse_tta_*``)."""

    def error(self, key: str, value) -> Optional[str]:
        return None


_FRACTION = _Number(0.0, 1.0)
_NON_NEGATIVE = _Number(0.0)
_FINITE = _Number()
_REAL = _Number(finite=False)  # the calibration's own check (validate_measure_config) gives its message

# The MEASURE section (tools/measure_bmd.py, bmd_d2.measure): (key, default, rule checked by
# validate_measure_config), in the order yacs lists them.
MEASURE_KEYS = (
    # Minimum detection score for a vertebra to be reported.
    ("SCORE_THRESHOLD", 0.5, _FRACTION),
    # Linear HU -> BMD calibration used by the classical measurement: BMD = (HU - INTERCEPT) / SLOPE.
    # A user phantom calibration file (JSON) overrides it.
    ("CALIBRATION_SLOPE", 1.0, _REAL),
    ("CALIBRATION_INTERCEPT", 0.0, _REAL),
    ("CALIBRATION_FILE", "", _ReadableFile()),
    # Which HU -> BMD calibration the classical BMD uses: "auto" (the phantom CALIBRATION_FILE when given, else the
    # internal calibration: the study's air, subcutaneous fat, paraspinal muscle and aortic blood fitted to the X-ray
    # physics of its spectrum, K2HPO4-equivalent mg/cm^3 with an uncertainty; where it cannot be trusted the nominal
    # line of the scan's kVp with the flags calibration_fallback + uncalibrated), "file" (CALIBRATION_FILE, required)
    # or "none" (the linear default above, every vertebra flagged uncalibrated). bmd_d2/measure/internal_calibration.py.
    ("CALIBRATION", "auto", _Choice("auto", "file", "none")),
    # Internal air/fat reference: measure air and fat in the scan and correct the HU scale to these nominal values
    # before the calibration (scanner drift correction; see bmd_d2/measure/classical.py). Applies to the file and
    # default calibrations; the internal calibration (CALIBRATION "auto" without a file) fits its own HU offset/gain.
    ("INTERNAL_REFERENCE", False, _Flag()),
    ("REFERENCE_AIR_HU", -1000.0, _FINITE),
    ("REFERENCE_FAT_HU", -100.0, _FINITE),
    # Erosion (mm, disk radius) of the sagittal vertebral mask before averaging HU: removes the cortical shell.
    ("EROSION_MM", 3.0, _NON_NEGATIVE),
    # Extra erosion along the sagittal rows (superior-inferior), as a fraction of the slice thickness: a thick slice
    # smears the dense endplates +-thickness/2 into the body. 0 gives a round (disk) erosion.
    ("EROSION_SLICE_FRACTION", 0.5, _NON_NEGATIVE),
    # Dense rim of the ROI: pixels within RIM_TRIM_MM of the eroded ROI's edge whose smoothed HU (mean of the 3 slices)
    # exceed the ROI interior's median by RIM_DENSE_HU, and connect to the edge through such pixels, are cortex or an
    # endplate the mask took in (a mask reaching past the posterior wall): they and a 1-pixel margin leave the ROI
    # (sagittal and 3-D). 0 mm turns it off.
    ("RIM_TRIM_MM", 3.0, _NON_NEGATIVE),
    ("RIM_DENSE_HU", 150.0, _NON_NEGATIVE),
    # Minimum pixels of the eroded ROI in one sagittal slice; fewer gives no classical value (flag roi_too_small).
    ("MIN_ROI_PIXELS", 20, _Number(0, integer=True)),
    # 3-D core: the eroded ROI extruded +-HALF_WIDTH mm perpendicular to the sagittal plane, sampled in the volume;
    # not computed (reason slices_too_thick / pixels_too_large) when the slice thickness (the larger of SliceThickness
    # and the slice spacing) or the pixel spacing exceeds CORE_MAX_SPACING_MM (mm; was 3.5 and compared the spacing
    # only; 5 mm slices, overlapping or with gaps, measure without bias on the phantoms, docs/measurement.md).
    ("CORE_HALF_WIDTH_MM", 5.0, _NON_NEGATIVE),
    ("CORE_MAX_SPACING_MM", 5.0, _NON_NEGATIVE),
    # The core's ROI keeps at least this many slice spacings from the endplates: the mask edge is known to half a
    # spacing and trilinear sampling reaches one spacing, so a shallower core blends in the slice nearest the endplate
    # (weight 1.5 - this at the core's edge). Deeper than the sagittal ROI (EROSION_MM + EROSION_SLICE_FRACTION x
    # thickness) only for spacings above (3 + thickness / 2) / 1.25 mm, e.g. 5 mm; up to 4 mm nothing changes.
    ("CORE_MIN_EROSION_SLICES", 1.25, _NON_NEGATIVE),
    # Plausible mean trabecular HU of bone (HU): below the low end the detection is rejected as not bone; above
    # the high end (metal, sclerosis) BMD is withheld (flag implausible_hu).
    ("PLAUSIBLE_HU", [-100.0, 800.0], _Ascending(2)),
    # Plausible sagittal mask area of a vertebral body (mm^2); outside it the detection is rejected. The sacrum
    # is checked against the lower bound only.
    ("MIN_AREA_MM2", 100.0, _NON_NEGATIVE),
    ("MAX_AREA_MM2", 3000.0, _NON_NEGATIVE),
    # Which BMD gives the reported value and categories: "learned" (model pred_bmd, or its learned HU through the
    # calibration), "classical" (sagittal ROI HU + calibration) or "classical_3d" (the 3-D core where measured, else
    # the sagittal ROI). docs/measurement.md ("Which value is reported") gives the figures behind the default.
    ("PRIMARY_BMD", "learned", _Choice("learned", "classical", "classical_3d")),
    # Flag large_learned_classical_difference when |learned - classical| exceeds this (mg/cm^3).
    ("MAX_BMD_DIFFERENCE", 30.0, _NON_NEGATIVE),
    # Robustness checks (bmd_d2/measure/qc.py, flags documented in docs/measurement.md).
    # A detection is rejected (not_bone) unless the 95th percentile HU of its mask (3 sagittal slices) reaches this:
    # a vertebral body always holds some cortex/endplate bone; water, soft tissue or a uniform blob does not.
    ("MIN_BONE_HU", 120.0, _FINITE),
    # Detections scoring below this (but above SCORE_THRESHOLD) are reported with the flag low_confidence.
    ("LOW_CONFIDENCE_SCORE", 0.7, _FRACTION),
    # Trabecular HU above this (and within PLAUSIBLE_HU) is flagged very_dense (sclerosis, compaction, cement).
    ("DENSE_HU", 400.0, _FINITE),
    # Any HU at or above this inside the vertebra (mask on the 3 sagittal slices or its 3-D extrusion) is metal:
    # flag metal, BMD withheld.
    ("METAL_HU", 2000.0, _FINITE),
    # Contrast phase: HU (90th percentile) of the brightest vessel-sized blob anterior to the vertebral bodies
    # (aorta/IVC; unenhanced blood reads 35-60 HU) at or above this flags contrast_enhanced (iodine raises
    # trabecular HU too).
    ("CONTRAST_HU", 120.0, _FINITE),
    # Genant semi-quantitative grade from the vertebral height reduction: >= 20 % grade 1 (mild), >= 25 % grade 2
    # (moderate), >= 40 % grade 3 (severe). Fractions, ascending.
    ("HEIGHT_LOSS_GRADES", [0.20, 0.25, 0.40], _Ascending(3, 0.0, 1.0)),
    # Level labels without a detected sacrum: "lowest_is_L5" (documented fallback, flagged) or "none".
    ("UNANCHORED_LEVEL_RULE", "lowest_is_L5", _Choice("lowest_is_L5", "none", show_value=False)),
    # Test-time shifts: extra model passes on the sagittal image moved by these [dy, dx] pixels (1 mm each; e.g.
    # [[0, 1], [1, 0], [1, 1]]), merged with the unshifted pass (mean mask probability, box, learned BMD; see
    # BMDStudyPredictor.detect). [] = one pass.
    ("TTA_SHIFTS", [], _Unchecked()),
    # Test-time sizes: extra unshifted passes with the model's input resized to these shortest-edge sizes instead of
    # INPUT.MIN_SIZE_TEST (e.g. [288]; the longest edge scales with them), merged the same way; their learned BMD is
    # not averaged (the BMD head is trained at one scale). [] = none.
    ("TTA_SIZES", [], _Unchecked()),
    # Evaluation: minimum mask IoU for a detection to match a ground-truth vertebra.
    ("EVAL_MATCH_IOU", 0.5, _FRACTION),
)


def add_measure_config(cfg):
    """Add the ``MEASURE`` section (:data:`MEASURE_KEYS`: defaults and their meaning) to ``cfg`` in place.

    Called by :func:`add_bmd_config`; :func:`validate_measure_config` checks the values.
    """
    cfg.MEASURE = CN()
    for key, default, _rule in MEASURE_KEYS:
        cfg.MEASURE[key] = copy.deepcopy(default)
    return cfg


def validate_measure_config(cfg) -> None:
    """Check every ``MEASURE`` key of ``cfg``: type, range, choice; the calibration file exists and can be read.

    ``MEASURE.TTA_SHIFTS`` / ``MEASURE.TTA_SIZES`` are checked where they are parsed (``BMDStudyPredictor``), the
    content of ``MEASURE.CALIBRATION_FILE`` where it is read (``load_calibration_file``).

    Raises:
        BMDError: the first bad value, one line naming the key.
    """
    m = cfg.MEASURE
    for key, _default, rule in MEASURE_KEYS:
        problem = rule.error(key, m[key])
        if problem:
            raise BMDError(problem)
    if m.MIN_AREA_MM2 >= m.MAX_AREA_MM2:
        raise BMDError(f"MEASURE.MIN_AREA_MM2 ({m.MIN_AREA_MM2:g}) must be below MEASURE.MAX_AREA_MM2 "
                       f"({m.MAX_AREA_MM2:g})")
    if m.CALIBRATION == "file" and not m.CALIBRATION_FILE:
        raise BMDError("MEASURE.CALIBRATION 'file' needs MEASURE.CALIBRATION_FILE (a phantom calibration JSON)")
    if m.CALIBRATION == "none" and m.CALIBRATION_FILE:
        raise BMDError("MEASURE.CALIBRATION 'none' uses the linear default: remove MEASURE.CALIBRATION_FILE or set "
                       "MEASURE.CALIBRATION to 'auto' or 'file'")
    if m.CALIBRATION_FILE:  # the file's calibration replaces the linear default
        _check_readable(m.CALIBRATION_FILE)
        return
    slope, intercept = float(m.CALIBRATION_SLOPE), float(m.CALIBRATION_INTERCEPT)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or abs(slope) < 1e-6:
        # the check and message of bmd_d2.measure.classical.Calibration, which meets the same values per study
        raise BMDError(f"invalid calibration: slope={slope} intercept={intercept} (need a finite, non-zero slope)")


def _check_readable(path: str) -> None:
    """``BMDError`` (the messages of ``load_calibration_file``) unless ``path`` opens for reading."""
    try:
        with open(path, encoding="utf-8"):
            pass
    except FileNotFoundError:
        raise BMDError("calibration file not found (MEASURE.CALIBRATION_FILE)", path=path) from None
    except (OSError, ValueError) as e:
        raise BMDError(f"cannot read calibration file: {e}", path=path) from None


def available_device(device: str) -> str:
    """``device`` (``MODEL.DEVICE``: "cpu", "cuda", "cuda:1", ...), or "cpu" with a warning when it names CUDA and
    this machine (process) has none."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            logger.warning("CUDA is not available: running on the CPU")
            return "cpu"
    return device


def get_bmd_cfg(config_file: str = "", opts=None, *, freeze: bool = True):
    """Build a config: ``get_cfg()`` + ``add_bmd_config`` + ``config_file`` + ``opts`` (a flat key/value list).

    Problems a user can fix (missing file, unknown key, bad value, missing weights file) raise ``BMDError`` with one
    line naming the file and the key, instead of yacs' traceback.

    Args:
        config_file: path of a YAML config; "" keeps the defaults.
        opts: e.g. ``["MODEL.WEIGHTS", "model.pth"]``.
        freeze: freeze the returned config.
    """
    from detectron2.config import get_cfg

    cfg = add_bmd_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise BMDError("config file not found", path=config_file)
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise BMDError(f"invalid config: {_exception_line(e)}", path=config_file) from e
        except Exception as e:  # yaml parse errors and the like
            raise BMDError(f"cannot read config ({type(e).__name__}): {_exception_line(e)}", path=config_file) from e
    if opts:
        if len(opts) % 2:
            raise BMDError(f"config overrides must be KEY VALUE pairs, got an odd number: {' '.join(map(str, opts))}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise BMDError(f"invalid config override: {_exception_line(e)}") from e
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise BMDError("model weights file not found (MODEL.WEIGHTS)", path=weights)
    validate_measure_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _exception_line(exc: BaseException) -> str:
    """A yacs/YAML exception as one line: its single argument unquoted (yacs quotes the key), else its text."""
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    return one_line(text.strip("'\""))
