"""Classical (non-learned) BMD: mean trabecular HU in an eroded vertebral mask, converted by a calibration.

Two measurements per vertebra:

* **Sagittal ROI** (always): the detected sagittal mask eroded by ``MEASURE.EROSION_MM`` (removing the cortical
  shell and partial-volume border), mean HU over the 3 sagittal slices (``SagittalImage.hu``). The erosion is an
  ellipse: ``EROSION_MM`` antero-posteriorly, plus ``MEASURE.EROSION_SLICE_FRACTION`` × the slice thickness along
  the sagittal rows (superior–inferior), because a slice of thickness t smears the dense endplates ±t/2 into the body
  (at 3 mm slices: 4.5 mm from the endplates, 3 mm from the anterior/posterior cortex).
* **3-D core** (where the geometry allows): the eroded sagittal ROI extruded ±``MEASURE.CORE_HALF_WIDTH_MM``
  perpendicular to the sagittal plane and sampled in the original volume (trilinear interpolation at the exact LPS
  positions given by ``SagittalImage.transform`` and ``Volume.affine``). Its ROI keeps at least
  ``MEASURE.CORE_MIN_EROSION_SLICES`` (1.25) slice spacings from the endplates: the mask edge is known to half a slice
  spacing, and a trilinear sample draws on the slices up to one spacing away, so a shallower core would blend in the
  slice that holds the endplate (up to 4 mm slices the sagittal ROI is already that deep and is used as it is).
  Samples beyond the outermost slice or pixel centre by at most half a voxel (the slab that edge voxel images) take the
  edge voxel's value. Not given (flag ``no_3d_core``, reason in ``VertebraResult.core_3d_reason``, see
  :data:`CORE_3D_REASONS`) when the slices are thicker than ``MEASURE.CORE_MAX_SPACING_MM``, there is no ROI, or the
  core leaves the scanned volume by more than that half voxel.

Calibration (``HU = slope · BMD + intercept``, so ``BMD = (HU - intercept) / slope``; BMD in mg/cm³):

* **Linear default**: ``MEASURE.CALIBRATION_SLOPE`` / ``MEASURE.CALIBRATION_INTERCEPT`` (1 HU per mg/cm³, 0 HU
  offset: a generic approximation for 120 kVp; use a phantom calibration for diagnosis).
* **Phantom calibration file** (``MEASURE.CALIBRATION_FILE``, JSON): either ``{"slope": s, "intercept": i}`` or
  ``{"rods": [{"bmd": 0, "hu": 3.1}, {"bmd": 100, "hu": 104.2}, ...]}`` (≥ 2 distinct densities, fitted by least
  squares), optionally ``"kvp"`` and ``"description"``.
* **Internal calibration** (``MEASURE.CALIBRATION "auto"`` without a file, the default): the study's own air,
  subcutaneous fat, paraspinal muscle and aortic blood fitted to the X-ray physics of its spectrum
  (:mod:`bmd_d2.measure.internal_calibration`), giving K2HPO4-equivalent mg/cm³ with an uncertainty; a study where it
  cannot be trusted falls back, with the flags ``calibration_fallback`` and ``uncalibrated``, to the nominal physics
  line of its kVp (or, without a usable kVp, the linear default; :func:`study_calibration`).
* **Internal air/fat reference** (``MEASURE.INTERNAL_REFERENCE``): the volume's air (< -850 HU, median) and
  subcutaneous/visceral fat (histogram mode in [-250, -30] HU) are measured and a linear HU correction maps them to
  their nominal values (``MEASURE.REFERENCE_AIR_HU``, ``MEASURE.REFERENCE_FAT_HU``) before the calibration: this
  corrects scanner HU drift; it is not a substitute for a phantom. It applies to the file and default calibrations;
  the internal calibration fits its own HU offset and gain, so it ignores it.

Which one (:func:`calibration_method`): ``MEASURE.CALIBRATION`` "auto" = the file when ``MEASURE.CALIBRATION_FILE``
is given, else the internal calibration; "file" = the file (required); "none" = the linear default, every vertebra
flagged ``uncalibrated``.
"""
import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from bmd_d2.data.sagittal import map_coordinates_f32
from bmd_d2.errors import BMDError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Linear HU → BMD calibration with an optional HU correction from an internal reference.

    ``BMD = (hu_gain · HU + hu_offset - intercept) / slope`` (mg/cm³).

    Attributes:
        slope: HU per mg/cm³.
        intercept: HU at 0 mg/cm³.
        source: "default", "file:<name>", "internal", "nominal", or with "+internal" appended (the air/fat HU
            correction).
        hu_gain, hu_offset: internal-reference correction (identity by default).
        details: how it was obtained (fit residuals, measured air/fat; for the internal calibration its ROIs, fit and
            slices: :meth:`~bmd_d2.measure.internal_calibration.InternalCalibration.to_dict`; for a fallback
            ``fallback_reason``).
        method: "default" (the generic linear line: BMD uncalibrated), "file" (a phantom calibration),
            "internal" (fitted to the study's reference tissues) or "nominal" (the internal calibration's fallback:
            the physics line of the scan's kVp with no tissue fitted, also uncalibrated).
        slope_sd, intercept_sd: 1-SD uncertainties (None when unknown).
        covariance: ``[[var slope, cov], [cov, var intercept]]`` or None.
        flags: QC flags the calibration raises for the study and every vertebra (``uncalibrated``,
            ``calibration_fallback``, ``calibration_contrast``, ``calibration_metal``).
    """

    slope: float = 1.0
    intercept: float = 0.0
    source: str = "default"
    hu_gain: float = 1.0
    hu_offset: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)
    method: str = "default"
    slope_sd: Optional[float] = None
    intercept_sd: Optional[float] = None
    covariance: Optional[List[List[float]]] = None
    flags: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)) or abs(self.slope) < 1e-6:
            raise BMDError(f"invalid calibration: slope={self.slope} intercept={self.intercept} (need a finite, "
                           "non-zero slope)")

    def correct_hu(self, hu):
        """Apply the internal-reference HU correction (identity without one)."""
        return self.hu_gain * np.asarray(hu, dtype=np.float64) + self.hu_offset if not np.isscalar(hu) \
            else self.hu_gain * float(hu) + self.hu_offset

    def hu_to_bmd(self, hu: Optional[float]) -> Optional[float]:
        """mg/cm³ from a mean HU; None stays None."""
        if hu is None or not math.isfinite(hu):
            return None
        return (self.correct_hu(float(hu)) - self.intercept) / self.slope

    def bmd_sd(self, hu: Optional[float]) -> Optional[float]:
        """1-SD uncertainty (mg/cm³) of :meth:`hu_to_bmd` from the calibration's covariance alone (not the HU
        measurement's noise); None without a covariance or for a None HU."""
        if hu is None or self.covariance is None or not math.isfinite(hu):
            return None
        g = np.array([-(self.correct_hu(float(hu)) - self.intercept) / self.slope ** 2, -1.0 / self.slope])
        return float(math.sqrt(max(float(g @ np.asarray(self.covariance, dtype=np.float64) @ g), 0.0)))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def load_calibration_file(path: str) -> Calibration:
    """Read a phantom calibration JSON (format in the module docstring).

    Raises:
        BMDError: unreadable file, bad JSON, missing keys, fewer than two distinct rod densities.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BMDError("calibration file not found (MEASURE.CALIBRATION_FILE)", path=path) from None
    except (OSError, ValueError) as e:
        raise BMDError(f"cannot read calibration file: {e}", path=path) from None
    name = f"file:{os.path.basename(path)}"
    if not isinstance(data, dict):
        raise BMDError("calibration file must hold a JSON object", path=path)
    try:
        if "rods" in data:
            rods = data["rods"]
            bmd = np.array([float(r["bmd"]) for r in rods])
            hu = np.array([float(r["hu"]) for r in rods])
            if len(np.unique(bmd)) < 2 or not (np.all(np.isfinite(bmd)) and np.all(np.isfinite(hu))):
                raise BMDError("calibration rods need at least two distinct, finite densities", path=path)
            slope, intercept = np.polyfit(bmd, hu, 1)
            resid = hu - (slope * bmd + intercept)
            details = {"rods": len(rods), "rms_residual_hu": float(np.sqrt(np.mean(resid ** 2)))}
            cal = Calibration(float(slope), float(intercept), name, details=details, method="file")
        else:
            cal = Calibration(float(data["slope"]), float(data["intercept"]), name, method="file")
    except BMDError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise BMDError(f"calibration file needs 'slope' and 'intercept' or 'rods' [{{bmd, hu}}, ...] ({e!r})",
                       path=path) from None
    for k in ("kvp", "description"):
        if k in data:
            cal.details[k] = data[k]
    return cal


def internal_reference(volume_hu: np.ndarray, *, air_hu: float = -1000.0, fat_hu: float = -100.0,
                       min_voxels: int = 500) -> Tuple[float, float, Dict[str, float]]:
    """HU correction from the air and fat inside a scan.

    Args:
        volume_hu: float ``(K, J, I)`` HU.
        air_hu, fat_hu: nominal HU of air and fat.
        min_voxels: voxels needed in each reference class.

    Returns:
        ``(gain, offset, details)`` with ``corrected = gain · HU + offset``.

    Raises:
        BMDError: no usable air or fat, or an implausible correction (gain outside 0.8–1.25).
    """
    v = np.asarray(volume_hu)
    sample = v.reshape(-1)[:: max(1, v.size // 4_000_000)]  # subsample big volumes
    air = sample[(sample < -850) & (sample > -1200)]
    fat = sample[(sample >= -250) & (sample <= -30)]
    if air.size < min_voxels or fat.size < min_voxels:
        raise BMDError(f"internal reference: too few air ({air.size}) or fat ({fat.size}) voxels")
    air_m = float(np.median(air))
    hist, edges = np.histogram(fat, bins=np.arange(-250, -29, 2.0))
    hist = ndimage.uniform_filter1d(hist.astype(np.float64), 5)
    fat_m = float(edges[int(np.argmax(hist))] + 1.0)
    if fat_m - air_m < 500:
        raise BMDError(f"internal reference: implausible air {air_m:.0f} HU / fat {fat_m:.0f} HU")
    gain = (fat_hu - air_hu) / (fat_m - air_m)
    offset = fat_hu - gain * fat_m
    if not 0.8 <= gain <= 1.25:
        raise BMDError(f"internal reference: implausible HU correction gain {gain:.2f}")
    return gain, offset, {"air_measured_hu": air_m, "fat_measured_hu": fat_m, "air_nominal_hu": air_hu,
                          "fat_nominal_hu": fat_hu}


def calibration_from_cfg(cfg, volume_hu: Optional[np.ndarray] = None) -> Calibration:
    """The calibration selected by ``cfg.MEASURE`` (file > linear default), with the internal reference if enabled.

    :func:`base_calibration` followed by :func:`with_internal_reference`; a predictor measuring many studies parses
    the file once with the first and applies the second per study.
    """
    return with_internal_reference(base_calibration(cfg), cfg, volume_hu)


def calibration_method(cfg) -> str:
    """What ``MEASURE.CALIBRATION`` selects: "file" (the phantom file), "internal" (the study's reference tissues) or
    "default" (the linear default, uncalibrated).

    Raises:
        BMDError: "file" without ``MEASURE.CALIBRATION_FILE`` (also checked by ``validate_measure_config``).
    """
    m = cfg.MEASURE
    mode = m.get("CALIBRATION", "auto")
    if mode == "file" and not m.CALIBRATION_FILE:
        raise BMDError("MEASURE.CALIBRATION 'file' needs MEASURE.CALIBRATION_FILE (a phantom calibration JSON)")
    if mode == "none":
        return "default"
    return "file" if m.CALIBRATION_FILE else "internal"


def default_calibration(cfg) -> Calibration:
    """The generic linear line (``MEASURE.CALIBRATION_SLOPE`` / ``CALIBRATION_INTERCEPT``), flagged ``uncalibrated``."""
    m = cfg.MEASURE
    return Calibration(float(m.CALIBRATION_SLOPE), float(m.CALIBRATION_INTERCEPT), "default",
                       flags=["uncalibrated"])


def base_calibration(cfg) -> Calibration:
    """The calibration of ``cfg.MEASURE`` before any per-study step: the phantom calibration file
    (``MEASURE.CALIBRATION_FILE``, parsed here) or the linear default (which the internal calibration replaces per
    study, :func:`study_calibration`).

    Raises:
        BMDError: the file cannot be read or parsed (:func:`load_calibration_file`); "file" without a file.
    """
    if calibration_method(cfg) == "file":
        return load_calibration_file(cfg.MEASURE.CALIBRATION_FILE)
    return default_calibration(cfg)


def study_calibration(cfg, volume, spine_lps) -> Calibration:
    """The internal calibration of one study (:func:`bmd_d2.measure.internal_calibration.internal_calibration`) as a
    :class:`Calibration`, or, where it cannot be trusted, a fallback flagged ``calibration_fallback`` and
    ``uncalibrated`` with the reason in ``details["fallback_reason"]``: the nominal physics line of the scan's kVp
    (:func:`~bmd_d2.measure.internal_calibration.nominal_line`, ``method`` "nominal", with its SD), else (no volume,
    a kVp outside 80–140 kV) the linear default.

    Args:
        cfg: the config (``MEASURE.METAL_HU``, ``CONTRAST_HU``, the linear default).
        volume: the study's ``Volume`` (``data``, ``affine``, ``meta["KVP"]``); None falls back.
        spine_lps: ``(N, 3)`` LPS centres of the measured vertebral bodies (None: the spine is searched for).
    """
    from .internal_calibration import internal_calibration, nominal_line

    m = cfg.MEASURE
    if volume is None:
        ic, kvp = None, None
        reason = "no source volume: the reference tissues are measured in the volume"
    else:
        kvp = _kvp_tag(volume)
        ic = internal_calibration(volume.data, volume.affine, kvp=kvp, spine_lps=spine_lps,
                                  metal_hu=float(m.METAL_HU), contrast_hu=float(m.CONTRAST_HU))
        reason = ic.reason
    details = ic.to_dict() if ic is not None else {}
    if ic is not None and ic.ok:
        return Calibration(ic.slope, ic.intercept, "internal", details=details, method="internal",
                           slope_sd=ic.slope_sd, intercept_sd=ic.intercept_sd, covariance=ic.covariance,
                           flags=list(ic.flags))
    flags = ["calibration_fallback", "uncalibrated"] + (list(ic.flags) if ic is not None else [])
    if ic is not None:
        try:
            line, cov, assumed = nominal_line(kvp, ic.info.get("wed_mm"))
        except ValueError as e:
            logger.warning("internal calibration not usable (%s), nor the nominal line (%s): generic default "
                           "calibration used", reason, e)
        else:
            logger.warning("internal calibration not usable (%s): nominal line of the %s used", reason,
                           f"{kvp:g} kVp tag" if kvp else "clinical kVp mix (no KVP tag)")
            return Calibration(float(line[0]), float(line[1]), "nominal", method="nominal",
                               slope_sd=float(math.sqrt(max(cov[0, 0], 0.0))),
                               intercept_sd=float(math.sqrt(max(cov[1, 1], 0.0))), covariance=cov.tolist(),
                               details={"fallback_reason": reason, "nominal": assumed, "internal": details},
                               flags=flags)
    else:
        logger.warning("internal calibration not usable (%s): generic default calibration used", reason)
    cal = default_calibration(cfg)
    cal.details = {"fallback_reason": reason, "internal": details}
    cal.flags = flags
    return cal


def _positive_meta(volume, key: str) -> Optional[float]:
    """The header value ``key`` of ``volume.meta`` as a number when given, finite and positive; else None."""
    meta = volume.meta if isinstance(getattr(volume, "meta", None), dict) else {}
    try:
        value = float(meta.get(key) or 0.0)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _kvp_tag(volume) -> Optional[float]:
    """The DICOM KVP of ``volume`` (kV) when given, finite and positive; else None."""
    return _positive_meta(volume, "KVP")


def with_internal_reference(calibration: Calibration, cfg, volume_hu: Optional[np.ndarray] = None) -> Calibration:
    """A copy of ``calibration`` with the study's internal air/fat HU correction when ``MEASURE.INTERNAL_REFERENCE``
    is on and the volume is given (``calibration`` itself is not changed).

    A failed internal reference falls back to no correction and records ``details["internal_reference_failed"]``.
    """
    m = cfg.MEASURE
    cal = copy.deepcopy(calibration)
    if m.INTERNAL_REFERENCE and volume_hu is not None and cal.method not in ("internal", "nominal"):
        try:
            gain, offset, det = internal_reference(volume_hu, air_hu=m.REFERENCE_AIR_HU, fat_hu=m.REFERENCE_FAT_HU)
            cal.hu_gain, cal.hu_offset = gain, offset
            cal.source += "+internal"
            cal.details.update(det)
        except BMDError as e:
            logger.warning("%s; default HU scale kept", e)
            cal.details["internal_reference_failed"] = str(e)
    return cal


# ---------------------------------------------------------------------------------------------------------------------
# ROI measurements
# ---------------------------------------------------------------------------------------------------------------------
def disk(radius_px: float) -> np.ndarray:
    """Bool disk structuring element of the given radius (pixels); a single pixel for radius < 1."""
    r = int(math.floor(radius_px))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= radius_px * radius_px + 1e-9


def _dicom_slice_thickness(volume) -> Optional[float]:
    """DICOM ``SliceThickness`` of ``volume`` (mm), or None when missing, malformed or not positive."""
    return _positive_meta(volume, "SliceThickness")


def slice_thickness_mm(volume) -> float:
    """Reconstructed slice thickness of ``volume`` (mm): the larger of the slice spacing and the DICOM
    ``SliceThickness`` (overlapping reconstructions are thicker than their spacing); 0 without a volume."""
    if volume is None:
        return 0.0
    return max(float(volume.spacing[0]), _dicom_slice_thickness(volume) or 0.0)


def ellipse(radius_rows_px: float, radius_cols_px: float) -> np.ndarray:
    """Bool elliptical structuring element with semi-axes ``radius_rows_px`` (rows) and ``radius_cols_px`` (columns)."""
    a, b = max(radius_rows_px, 1e-6), max(radius_cols_px, 1e-6)
    y, x = np.mgrid[-int(math.floor(a)):int(math.floor(a)) + 1, -int(math.floor(b)):int(math.floor(b)) + 1]
    return (y / a) ** 2 + (x / b) ** 2 <= 1.0 + 1e-9


def erode_roi_ellipse(mask: np.ndarray, radius_px: float, radius_rows_px: Optional[float] = None) -> np.ndarray:
    """The trabecular ROI of a sagittal mask: the bool ``(H, W)`` mask eroded with a disk of ``radius_px`` (or, with
    ``radius_rows_px``, an ellipse of that semi-axis along the rows and ``radius_px`` along the columns); pixels outside
    the image count as background. (Not the model's ``stacked_erosion`` of ROI-grid mask tensors.)"""
    mask = np.asarray(mask, dtype=bool)
    rows = radius_px if radius_rows_px is None else radius_rows_px
    if radius_px < 1 and rows < 1:
        return mask.copy()
    se = disk(radius_px) if rows == radius_px else ellipse(rows, radius_px)
    return ndimage.binary_erosion(mask, structure=se, border_value=0)


def trim_dense_rim(roi: np.ndarray, hu: np.ndarray, spacing_mm: float, rim_mm: float, dense_hu: float,
                   min_pixels: int = 0) -> Tuple[np.ndarray, int]:
    """The ROI less a dense rim: cortex or endplate bone that an over-reaching mask brought inside the eroded ROI.

    A pixel is dense when its smoothed HU (mean of the sagittal slices, Gaussian σ 0.7 mm) exceeds the median of the
    ROI's interior (the pixels deeper than ``rim_mm``) by ``dense_hu``; dense pixels within ``rim_mm`` of the ROI's
    edge that connect to the edge through dense pixels leave the ROI with a 1-pixel margin. Trabecular bone, even a
    sclerotic island (+150–400 mg/cm³ over a few mm), rarely reaches the threshold after smoothing; a cortical wall
    (600–1000 mg/cm³) always does. Selection by position first, value second: the interior is never touched.

    Args:
        roi: bool ``(H, W)`` eroded ROI.
        hu: float ``(S, H, W)`` or ``(H, W)`` sagittal HU.
        spacing_mm: pixel spacing.
        rim_mm: depth of the rim examined (0: nothing trimmed).
        dense_hu: HU above the interior's median that make a rim pixel dense.
        min_pixels: a trimmed ROI smaller than this is not used (the ROI is returned unchanged).

    Returns:
        ``(roi, removed)``: the trimmed ROI (a new array) and the number of pixels removed.
    """
    roi = np.asarray(roi, dtype=bool)
    if rim_mm <= 0 or not roi.any():
        return roi.copy(), 0
    img = np.asarray(hu, dtype=np.float32)
    img = img.mean(0) if img.ndim == 3 else img
    depth = ndimage.distance_transform_edt(roi) * float(spacing_mm)
    interior = roi & (depth > rim_mm)
    if int(interior.sum()) < max(int(min_pixels), 10):
        return roi.copy(), 0
    g = ndimage.gaussian_filter(img, 0.7 / float(spacing_mm))
    dense = roi & (depth <= rim_mm) & (g > float(np.median(img[interior])) + float(dense_hu))
    seeds = dense & (depth <= 1.5 * float(spacing_mm))
    if not seeds.any():
        return roi.copy(), 0
    leak = ndimage.binary_propagation(seeds, mask=dense)
    out = roi & ~ndimage.binary_dilation(leak, structure=ndimage.generate_binary_structure(2, 1))
    if int(out.sum()) < int(min_pixels):
        return roi.copy(), 0
    return out, int(roi.sum() - out.sum())


def sagittal_roi_hu(hu: np.ndarray, roi: np.ndarray) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and SD of HU in ``roi`` over all sagittal slices.

    Args:
        hu: float ``(S, H, W)`` HU of the S (=3) sagittal slices.
        roi: bool ``(H, W)``.

    Returns:
        ``(mean_hu, sd_hu, n)``; mean/SD are None for an empty ROI. NaN pixels (outside the volume) are ignored.
    """
    hu = np.asarray(hu)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.shape[1:] != roi.shape:
        raise ValueError(f"HU {hu.shape} and ROI {roi.shape} do not match")
    vals = hu[:, roi].reshape(-1).astype(np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return None, None, 0
    return float(vals.mean()), float(vals.std()), int(vals.size)


def core_points_lps(transform: np.ndarray, roi: np.ndarray, half_width_mm: float,
                    step_mm: Optional[float] = None) -> np.ndarray:
    """LPS positions (mm) of the 3-D core: the ROI pixels repeated at lateral offsets within ±``half_width_mm``.

    Args:
        transform: 4×4 sagittal transform ``(col, row, channel - 1, 1)`` → LPS.
        roi: bool ``(H, W)``.
        half_width_mm: half thickness of the core perpendicular to the sagittal plane.
        step_mm: lateral sampling step (default: the channel spacing of ``transform``).

    Returns:
        float64 ``(N, 3)``.
    """
    t = np.asarray(transform, dtype=np.float64)
    ch_mm = float(np.linalg.norm(t[:3, 2]))
    step = step_mm or ch_mm
    n_side = int(math.floor(half_width_mm / step + 1e-9))
    offsets = np.arange(-n_side, n_side + 1) * step / ch_mm  # channel units
    rows, cols = np.nonzero(roi)
    pts = np.empty((offsets.size * rows.size, 4))
    pts[:, 0] = np.tile(cols, offsets.size)
    pts[:, 1] = np.tile(rows, offsets.size)
    pts[:, 2] = np.repeat(offsets, rows.size)
    pts[:, 3] = 1.0
    return (pts @ t.T)[:, :3]


def _points_to_index(volume_affine: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Fractional voxel indices ``(N, 3)`` in ``(i, j, k)`` order of LPS points ``(N, 3)``."""
    inv = np.linalg.inv(np.asarray(volume_affine, dtype=np.float64))
    return (np.c_[points_lps, np.ones(len(points_lps))] @ inv.T)[:, :3]


def core_samples_3d(volume_data: np.ndarray, volume_affine: np.ndarray, points_lps: np.ndarray,
                    edge_tolerance=1e-3) -> Optional[np.ndarray]:
    """The volume sampled (trilinear) at ``points_lps``: float32 ``(N,)``, or None when there are no points or any
    point lies outside the volume by more than ``edge_tolerance`` (see :func:`core_hu_3d`)."""
    if len(points_lps) == 0:
        return None
    ijk = _points_to_index(volume_affine, points_lps)
    shape = np.asarray(volume_data.shape)[::-1]  # (I, J, K)
    tol = np.asarray(edge_tolerance, dtype=np.float64)
    if np.any(ijk < -tol) or np.any(ijk > shape - 1 + tol):
        return None
    coords = np.clip(ijk[:, [2, 1, 0]].T, 0, (shape[::-1] - 1)[:, None])
    return map_coordinates_f32(volume_data, coords, order=1, mode="nearest")


def core_hu_3d(volume_data: np.ndarray, volume_affine: np.ndarray, points_lps: np.ndarray,
               edge_tolerance=1e-3) -> Tuple[Optional[float], int]:
    """Mean HU of the volume sampled (trilinear) at ``points_lps``.

    Args:
        volume_data: ``(K, J, I)`` HU (float32, or int16: sampled without a float copy).
        volume_affine: 4×4 ``(i, j, k, 1)`` → LPS.
        points_lps: ``(N, 3)`` mm.
        edge_tolerance: how far (voxel index units; a scalar or per axis in ``(i, j, k)`` order) a point may lie beyond
            the outermost voxel centres; such points take the edge voxel's value.

    Returns:
        ``(mean_hu, n)``; ``(None, 0)`` when there are no points or any point lies outside the volume by more than
        ``edge_tolerance``.
    """
    vals = core_samples_3d(volume_data, volume_affine, points_lps, edge_tolerance)
    if vals is None:
        return None, 0
    return float(np.mean(vals)), int(vals.size)


def _trimmed_layers(vals: np.ndarray, roi: np.ndarray, spacing_mm: float, rim_mm: float, dense_hu: float,
                    min_pixels: int) -> Tuple[np.ndarray, int]:
    """``vals`` (the core's samples, one ROI-sized layer per lateral offset, :func:`core_points_lps` order) with each
    layer's dense rim (:func:`trim_dense_rim` on that layer) left out: the kept samples and the number dropped."""
    n_roi = int(np.count_nonzero(roi))
    layers = vals.reshape(-1, n_roi)
    img = np.zeros(roi.shape, np.float32)
    kept, dropped = [], 0
    for layer in layers:
        img[roi] = layer
        # outside the ROI: the layer's median, so the smoothing at the ROI's edge sees no artificial step
        img[~roi] = float(np.median(layer))
        keep, removed = trim_dense_rim(roi, img, spacing_mm, rim_mm, dense_hu, min_pixels)
        kept.append(layer[keep[roi]])
        dropped += removed
    return np.concatenate(kept), dropped


#: Why a vertebra has no 3-D core value (``VertebraResult.core_3d_reason``; ``core_3d_detail`` gives the figures).
CORE_3D_REASONS = {
    "no_volume": "measured on a sagittal image without its source volume",
    "slices_too_thick": "slice thickness (the larger of SliceThickness and the slice spacing) above "
                        "MEASURE.CORE_MAX_SPACING_MM",
    "pixels_too_large": "in-plane pixel spacing above MEASURE.CORE_MAX_SPACING_MM",
    "no_roi": "no trabecular ROI to extrude: the sagittal ROI is too small (roi_too_small), or fewer than "
              "MEASURE.MIN_ROI_PIXELS pixels stay after the core's slice-spacing erosion",
    "outside_volume": "part of the core lies outside the scanned volume by more than half an edge voxel",
}


@dataclass
class Core3D:
    """The 3-D core of one vertebra.

    Attributes:
        hu: mean HU, or None when not measured.
        n: samples averaged.
        trimmed: samples left out as a dense rim (:func:`trim_dense_rim` per lateral layer).
        reason: None when measured, else a key of :data:`CORE_3D_REASONS`.
        detail: one line with the figures behind ``reason`` (or, when measured, the clamped edge samples); "" if none.
    """

    hu: Optional[float] = None
    n: int = 0
    reason: Optional[str] = None
    detail: str = ""
    trimmed: int = 0


def _nominal_slice_thickness(volume) -> float:
    """The slab one slice images (mm): DICOM ``SliceThickness`` when given, else the slice spacing."""
    return _dicom_slice_thickness(volume) or float(volume.spacing[0])


def core_volume_reason(volume, max_slice_mm: float) -> Tuple[Optional[str], str]:
    """Whether ``volume``'s geometry allows a 3-D core: ``(None, "")``, or ``(reason, detail)`` for every vertebra.

    Args:
        volume: the source ``Volume`` or None.
        max_slice_mm: ``MEASURE.CORE_MAX_SPACING_MM``: the largest slice thickness (``slice_thickness_mm``: the larger
            of ``SliceThickness`` and the slice spacing) and in-plane pixel spacing allowed.
    """
    if volume is None:
        return "no_volume", "no source volume: the 3-D core is sampled in the volume"
    thick = slice_thickness_mm(volume)
    tol = 1e-3  # mm: spacings from rounded DICOM positions (5.000000000000001 for 5 mm slices)
    if thick > max_slice_mm + tol:
        return "slices_too_thick", (f"slices {thick:g} mm thick (SliceThickness or spacing) > "
                                    f"MEASURE.CORE_MAX_SPACING_MM {max_slice_mm:g} mm")
    pixel = max(float(volume.spacing[1]), float(volume.spacing[2]))
    if pixel > max_slice_mm + tol:
        return "pixels_too_large", f"pixels {pixel:g} mm > MEASURE.CORE_MAX_SPACING_MM {max_slice_mm:g} mm"
    return None, ""


def core_min_rows_erosion_mm(volume, min_slices: float) -> float:
    """Least superior–inferior erosion (mm) of the 3-D core's ROI: ``min_slices`` (``MEASURE.CORE_MIN_EROSION_SLICES``)
    slice spacings; where the sagittal ROI's erosion (``EROSION_MM + EROSION_SLICE_FRACTION`` × thickness) is deeper,
    the core uses the sagittal ROI itself.

    The mask's endplate edge is known to ± half a slice spacing, and a trilinear sample blends the slices up to one
    spacing away, so at ``min_slices`` spacings from the mask edge the slice nearest the endplate (which the slice
    profile fills with endplate bone) weighs at most ``1.5 - min_slices``. The default 1.25 (at most 1/4, and nothing
    a quarter spacing further in) is as deep as the sagittal ROI of 4 mm slices and of 5 mm slices every 4.25 mm,
    which measure without bias on the phantoms; 5 mm every 5 mm and 3 mm every 5 mm get 6.25 mm instead of 5.5 mm
    (bias +3.6 → +1.0 and +5.0 → +1.7 HU; 1.5 would cost the 4 and 4.25 mm series −1.5 HU: the phantom's core centre
    is less dense than its mean). Slices up to 4 mm thick, contiguous or overlapping, keep the sagittal ROI.
    """
    return float(min_slices) * float(volume.spacing[0])


def _edge_name(past: np.ndarray) -> str:
    """Which edge of the volume is passed, from bool ``past`` ``(N, 3)`` (sample past the edge along ``i, j, k``)."""
    slices, in_plane = bool(np.any(past[:, 2])), bool(np.any(past[:, :2]))
    return "slice range and field of view" if slices and in_plane else ("slice range" if slices else "field of view")


def measure_core_3d(volume, transform: np.ndarray, roi: np.ndarray, half_width_mm: float,
                    min_roi_pixels: int = 1, rim_mm: float = 0.0, rim_dense_hu: float = 150.0) -> Core3D:
    """Mean HU of the 3-D core: ``roi`` extruded ±``half_width_mm`` (:func:`core_points_lps`) and sampled in ``volume``.

    Samples beyond the outermost voxel centres by at most half a voxel (half the nominal slice thickness along the
    slices, half a pixel in-plane: the slab the edge voxel images) take the edge voxel's value (listed in ``detail``);
    farther ones make the core ``outside_volume``, with the share of samples and the distance in ``detail``.

    Args:
        volume: source ``Volume`` (``data``, ``affine``, ``spacing``, ``meta``).
        transform: 4×4 sagittal transform ``(col, row, channel - 1, 1)`` → LPS.
        roi: bool ``(H, W)`` ROI of the core (eroded mask).
        half_width_mm: half thickness of the core perpendicular to the sagittal plane.
        min_roi_pixels: fewest ROI pixels for a core (fewer: ``no_roi``).
        rim_mm, rim_dense_hu: each lateral layer of the core loses its dense rim (:func:`trim_dense_rim`; a pedicle's
            base or the posterior wall the mask reached into, off the sagittal slices); 0 mm keeps every sample.
    """
    n_roi = int(np.count_nonzero(roi))
    if n_roi < max(1, int(min_roi_pixels)):
        return Core3D(reason="no_roi", detail=f"core ROI {n_roi} px < MEASURE.MIN_ROI_PIXELS {int(min_roi_pixels)} "
                                              "after the slice-spacing erosion")
    pts = core_points_lps(transform, roi, half_width_mm)
    spacing_ijk = np.array([float(volume.spacing[2]), float(volume.spacing[1]), float(volume.spacing[0])])
    tol = np.array([0.5, 0.5, 0.5 * _nominal_slice_thickness(volume) / spacing_ijk[2]])
    ijk = _points_to_index(volume.affine, pts)
    last = np.asarray(volume.data.shape, dtype=np.float64)[::-1] - 1
    beyond = np.maximum(-ijk, ijk - last).clip(min=0.0)  # (N, 3) index units past the edge voxel centres
    outside = np.any(beyond > tol + 1e-3, axis=1)
    beyond_mm, tol_mm = beyond * spacing_ijk, tol * spacing_ijk
    if outside.any():
        return Core3D(reason="outside_volume",
                      detail=f"{100 * outside.mean():.1f} % of the core's {len(pts)} samples lie outside the scanned "
                             f"{_edge_name(beyond[outside] > tol + 1e-3)}, up to "
                             f"{float(beyond_mm[outside].max()):.1f} mm beyond its outermost voxel centre (half a "
                             f"voxel is tolerated: {tol_mm[2]:.2g} mm along the slices, {max(tol_mm[:2]):.2g} mm "
                             "in-plane)")
    vals = core_samples_3d(volume.data, volume.affine, pts, edge_tolerance=tol + 1e-3)
    trimmed = 0
    if rim_mm > 0:
        spacing = float(np.linalg.norm(np.asarray(transform, dtype=np.float64)[:3, 0]))
        vals, trimmed = _trimmed_layers(vals, np.asarray(roi, dtype=bool), spacing, rim_mm, rim_dense_hu,
                                        min_roi_pixels)
    hu, n = float(np.mean(vals)), int(vals.size)
    clamped = np.any(beyond > 1e-3, axis=1)
    detail = ""
    if clamped.any():
        detail = (f"{int(clamped.sum())} of {len(pts)} samples, up to {float(beyond_mm[clamped].max()):.1f} mm beyond "
                  f"the outermost voxel centre of the {_edge_name(beyond[clamped] > 1e-3)}, take the edge voxel's "
                  "value")
    return Core3D(hu=hu, n=n, detail=detail, trimmed=trimmed)


def vertebral_heights(mask: np.ndarray, spacing_mm: float, anterior_is_low_column: bool = True
                      ) -> Dict[str, Optional[float]]:
    """Anterior, middle and posterior heights (mm) of a sagittal vertebral-body mask.

    The body's antero-posterior axis is its principal axis closest to the image columns; a height is the median,
    over the 1-pixel-wide lines perpendicular to that axis inside a band around 15 %, 50 % or 85 % of the AP extent
    (band width 20 %), of the mask's extent along the line (the median damps pixel quantisation and rounded corners).

    Args:
        mask: bool ``(H, W)``.
        spacing_mm: pixel size (mm).
        anterior_is_low_column: whether anterior is toward column 0 (the sagittal image's convention).

    Returns:
        ``{"anterior": mm, "middle": mm, "posterior": mm}``; values None for masks under 10 pixels.
    """
    rows, cols = np.nonzero(mask)
    if rows.size < 10:
        return {"anterior": None, "middle": None, "posterior": None}
    pts = np.c_[cols, rows].astype(np.float64)
    pts -= pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov(pts.T))
    ap = vecs[:, int(np.argmax(np.abs(vecs[0])))]  # eigenvector with the largest column component
    if ap[0] < 0:
        ap = -ap
    if not anterior_is_low_column:
        ap = -ap
    si = np.array([-ap[1], ap[0]])
    a, s = pts @ ap, pts @ si
    lo, hi = a.min(), a.max()
    out = {}
    line = np.rint(a).astype(np.int64)
    for name, frac in (("anterior", 0.15), ("middle", 0.5), ("posterior", 0.85)):
        c = lo + frac * (hi - lo)
        band = np.abs(a - c) <= max(0.10 * (hi - lo), 0.5)
        if not band.any():
            out[name] = None
            continue
        ext = [np.ptp(s[band & (line == q)]) + 1.0 for q in np.unique(line[band])]
        out[name] = float(np.median(ext) * spacing_mm)
    return out
