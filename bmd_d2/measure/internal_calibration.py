"""Internal (phantomless) calibration: the study's HU → BMD line from the reference tissues in its own image.

Every tissue's CT number follows the one X-ray spectrum of the scan, so the HU of air, fat, muscle and blood reveal
the spectrum, and the spectrum gives the HU of a K2HPO4 calibration rod (the effective-energy method of Michalski et
al. 2020, with the attenuation physics of :mod:`bmd_d2.phantoms.physics` instead of tabulated effective energies).

Steps (:func:`internal_calibration`):

1. **Slices.** One axial slice at each vertebral level (the ``spine_lps`` points: the measured vertebral bodies'
   centres; without them the spine is looked for in the slices, :func:`find_spine_points`), plus slices 8 mm above
   and below each when there are fewer than six levels. Slices holding metal
   (any voxel ≥ ``metal_hu``) are replaced by a clean neighbour within 10 mm or skipped. Each slice is block-averaged
   to ~1.5–2 mm pixels (speed; block means keep the ROI means unbiased).
2. **Reference ROIs** (:func:`find_reference_rois`), each a set of voxels whose HU are *not* selected by value, only
   located by shape and position (a smoothed copy of the slice gives the masks; the measured values are the
   unsmoothed ones, so the window does not bias them):

   * ``air``: outside the patient, at least 10 mm from anything denser than -950 HU (patient, arms, table,
     blankets), inside the reconstruction circle (the matrix's inscribed circle less 10 mm) and 5 mm away from padding
     (< -1100 HU). Never bowel gas or lung: those lie inside the patient's filled outline.
   * ``fat``: subcutaneous fat, the fat-like (smoothed -200…-40 HU) pixels 2–45 mm inside the skin that connect to the
     skin, eroded by one pixel.
   * ``muscle``: paraspinal (erector spinae) muscle, the muscle-like (smoothed -20…120 HU) pixels 25–110 mm
     posterior of the vertebral body's centre and 8–75 mm beside it, 6 mm inside the skin, 4 mm from bone, eroded by
     one pixel, in blobs of ≥ 150 mm².
   * ``blood``: the abdominal aorta, the roundest blood-like (smoothed 0…110 HU) blob of 6–16 mm inscribed radius in
     front of the vertebral body (from 5 mm behind to 80 mm in front of its anterior edge at the midline, 35 mm right
     to 50 mm left of its centre; never the body itself: the bone > 150 HU at the spine point, filled), distinct from
     its surroundings (half of a 4 mm ring around it ≥ 40 HU away), its pixels ≥ 3 mm inside the wall; slices whose
     aorta reads more than 12 HU off the other slices' median are dropped. The same search over 130…900 HU finds an
     enhanced aorta: found at half of the slices or more (median HU ≥ ``contrast_hu``), or unenhanced "blood" above
     80 HU, the scan counts as contrast-enhanced: blood is left out of the fit (flag ``calibration_contrast``) and
     muscle, which enhances a little, weighs half.

   Per tissue: voxels (of the original grid), mean, median and robust SD (1.4826 × MAD) of the block means, slices.
3. **Water-equivalent diameter** (AAPM TG 220) of the patient outline at those slices:
   ``WED = 2 sqrt((1 + mean HU / 1000) · area / pi)``; the spectrum is hardened through ``hardening_fraction × WED``.
4. **Fit** (:func:`fit_reference_tissues`): ``measured HU(t) = offset + gain · HU_physics(t; spectrum)`` with the
   spectrum ``physics.tube_spectrum(kVp, al_mm=filtration, water_mm=thickness)``. Unknown: offset, gain, filtration
   (mm Al: stands for every hardening of the tube side, i.e. the effective energy) and the hardening thickness, each
   with a prior (offset 0 ± 4 HU and gain 1 ± 0.01: the scanner's water/air calibration tolerances; filtration
   7.5 ± 4 mm Al, wide enough for copper-filtered tubes (0.1–0.4 mm Cu ≈ 10–20 mm Al); thickness from the WED ± 12 %),
   so the fit is determined even with a tissue missing. Tissues weigh by their biological spread (:data:`TISSUE_SD_HU`:
   air 4, fat 6, muscle 12, blood 4.5 HU; the materials: :func:`_materials`) plus their measurement error. A tissue
   more than 3.5 SD off the fit is dropped once and the fit repeated. The kVp is the DICOM ``KVP`` tag when given;
   otherwise each of 80–140 kV (10 kV steps) is fitted and the results are averaged by prior (120 kVp most likely) ×
   likelihood (``kvp_source: "fitted"``).
5. **Calibration line**: ``slope = gain · dHU/d(mg/cm³)`` of K2HPO4 in water (:func:`physics.mineral_in`) through the
   fitted spectrum, ``intercept = offset + gain · HU(water) = offset``: what an ideal phantom of K2HPO4-in-water rods
   imaged with the same spectrum would read. The fit's covariance (Gauss–Newton, scaled up by the reduced χ² when it
   exceeds 1; without a KVP tag plus the spread over the kVps) is carried to ``slope_sd``, ``intercept_sd`` and
   their covariance, and from there to each vertebra's BMD (:meth:`InternalCalibration.bmd_sd`).

A study where this cannot be trusted never yields a number without a flag: no fat, no muscle and no blood, too few
voxels, metal in every slice, a fit off its tissues, or a spectrum outside the physical range (filtration at the
edge of 0.5–20 mm Al, effective energy outside 45–100 keV, gain outside 0.85–1.15, offset beyond ±50 HU) give
``ok = False`` with ``reason``; the measurement then uses the *nominal* line of the scan's kVp (:func:`nominal_line`:
the fit's priors, no tissue) with the flags ``calibration_fallback`` and ``uncalibrated``, or the generic default
where not even that is possible (:func:`bmd_d2.measure.classical.study_calibration`).

Costs: ~0.1–0.2 s CPU per 512² study on one core once the spectra are cached (the first study of a process adds
the spekpy anode spectra, ~0.4 s per kVp; all seven without a KVP tag).

Measured figures (generator-v5 phantoms, the real CT): docs/measurement.md, "Internal (phantomless) calibration".
"""
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "TISSUES", "TISSUE_SD_HU", "TissueROI", "SpectrumFit", "InternalCalibration", "find_spine_points",
    "find_reference_rois", "water_equivalent_diameter", "fit_reference_tissues", "internal_calibration",
    "nominal_line", "physics_hu",
]

#: Reference tissues of the fit (their materials: :func:`_materials`).
TISSUES = ("air", "fat", "muscle", "blood")
#: Volume share of fat assumed in paraspinal muscle (adults: a few % when young, 10-20 % in the elderly).
MUSCLE_FAT_FRACTION = 0.10
#: Hematocrit assumed for blood (adult mean).
HEMATOCRIT = 0.42
#: Biological / model spread of each tissue's HU about its physics value (HU, 1 SD): the weights of the fit (fat:
#: adipose density ±0.6 %; muscle: fat infiltration ±8 %; blood: hematocrit ±0.05).
TISSUE_SD_HU = {"air": 4.0, "fat": 6.0, "muscle": 12.0, "blood": 4.5}
#: Fewest voxels (of the original grid) for a tissue to enter the fit ...
MIN_VOXELS = {"air": 2000, "fat": 500, "muscle": 500, "blood": 100}
#: ... or, on coarse pixels, the least area (mm², all slices: the voxel counts above at a 0.75 mm pixel), with at
#: least :data:`MIN_BLOCK_VALUES` block means: a 2.6 mm reconstruction's paraspinal muscle of 289 voxels covers
#: 1950 mm², more than 500 voxels of a 0.75 mm one.
MIN_AREA_MM2 = {"air": 1125.0, "fat": 280.0, "muscle": 280.0, "blood": 56.0}
MIN_BLOCK_VALUES = 30
#: Tube potentials tried without a KVP tag and their prior weights (clinical practice: most abdominal CT at 120 kVp,
#: dose-reduced protocols at 100 kVp, some at 80 or 140).
_KVPS_UNKNOWN = {80.0: 0.08, 90.0: 0.04, 100.0: 0.18, 110.0: 0.08, 120.0: 0.42, 130.0: 0.08, 140.0: 0.12}
_KVP_RANGE = (80.0, 140.0)
_ROD_MG = 200.0  # two-point slope of the K2HPO4-in-water rod (exact: HU is linear in the mineral)
# priors (mean, SD) of the fitted parameters; the hardening thickness is the WED's. Offset and gain: the scanner's
# daily water (0 ± 4 HU) and air (-1000 ± 10 HU) calibration tolerances; they fix the offset, so the fat and muscle HU tell
# more of the spectrum. Filtration (mm Al-equivalent): plain tubes ~5-9 mm, copper-filtered ones (0.1-0.4 mm Cu) ~10-20 mm; a
# narrower prior (7.5 ± 2.5) pulled those down to a softer spectrum and slopes 8-10 % too high; a higher mean pulls
# plain tubes up instead (the soft tissues pin the filtration only loosely).
_PRIOR_OFFSET, _PRIOR_GAIN, _PRIOR_AL = (0.0, 4.0), (1.0, 0.01), (7.5, 4.0)
_PRIOR_WATER_REL = 0.12
_BOUNDS_AL = (0.5, 20.0)
_PLAUSIBLE = {"effective_energy_kev": (45.0, 100.0), "gain": (0.85, 1.15), "offset": (-50.0, 50.0)}
_MAX_RESIDUAL_SD = 3.5
_PIXEL_TARGET_MM = 2.0  # slices are block-averaged to the largest whole factor below this pixel size


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TissueROI:
    """One reference tissue as measured.

    Attributes:
        name: ``air``, ``fat``, ``muscle`` or ``blood``.
        voxels: voxels of the original grid in the ROI (all slices).
        slices: slices that contributed.
        mean_hu, median_hu, robust_sd_hu: of the block-averaged values (robust SD = 1.4826 × MAD); None when empty.
        used: whether it entered the final fit.
        reason: why not ("" when used): ``too few voxels``, ``contrast``, ``clipped``, ``outlier`` ...
        physics_hu: the fitted model's HU for it (offset + gain · physics HU), None before the fit.
        residual_hu: ``median_hu - physics_hu``.
    """

    name: str
    voxels: int = 0
    slices: int = 0
    mean_hu: Optional[float] = None
    median_hu: Optional[float] = None
    robust_sd_hu: Optional[float] = None
    used: bool = False
    reason: str = ""
    physics_hu: Optional[float] = None
    residual_hu: Optional[float] = None


@dataclass
class SpectrumFit:
    """The fitted spectrum and scanner scale.

    Attributes:
        kvp: tube potential used (kV); ``kvp_source``: ``"tag"`` (DICOM KVP) or ``"fitted"``.
        al_mm, al_mm_sd: fitted filtration (mm Al-equivalent) and its SD.
        water_mm, water_mm_sd: fitted hardening thickness (mm of water) and its SD; ``wed_mm``: the measured WED.
        effective_energy_kev: effective energy of the fitted (hardened) spectrum.
        offset, offset_sd: HU offset; ``gain``, ``gain_sd``: HU scale.
        chi2: χ² of the tissues (not the priors); ``tissues``: how many were fitted.
        kvp_weights: for a fitted kVp, the likelihood weight of each kVp tried.
    """

    kvp: float
    kvp_source: str
    al_mm: float
    al_mm_sd: float
    water_mm: float
    water_mm_sd: float
    wed_mm: float
    effective_energy_kev: float
    offset: float
    offset_sd: float
    gain: float
    gain_sd: float
    chi2: float
    tissues: int
    kvp_weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class InternalCalibration:
    """The internal calibration of one study.

    Attributes:
        ok: whether the calibration can be used (else ``reason`` says why and the caller falls back).
        reason: "" or one line.
        slope, intercept: HU per mg/cm³ K2HPO4 and HU at 0 mg/cm³ (``HU = slope · BMD + intercept``); None when not ok
            and no fit was possible.
        slope_sd, intercept_sd, covariance: 1-SD uncertainties and the 2×2 covariance of (slope, intercept).
        fit: the spectrum fit (None when none was possible).
        rois: one :class:`TissueROI` per tissue of :data:`TISSUES`.
        flags: QC flags (``calibration_contrast``, ``calibration_metal``).
        info: how the ROIs were found (slices, spine source, block factor, contrast search, WED per slice).
        seconds: time taken (not in :meth:`to_dict`).
    """

    ok: bool
    reason: str = ""
    slope: Optional[float] = None
    intercept: Optional[float] = None
    slope_sd: Optional[float] = None
    intercept_sd: Optional[float] = None
    covariance: Optional[List[List[float]]] = None
    fit: Optional[SpectrumFit] = None
    rois: List[TissueROI] = field(default_factory=list)
    flags: List[str] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def roi(self, name: str) -> Optional[TissueROI]:
        """The ROI of tissue ``name`` or None."""
        return next((r for r in self.rois if r.name == name), None)

    def bmd_sd(self, hu: Optional[float]) -> Optional[float]:
        """1-SD uncertainty (mg/cm³) of ``(hu - intercept) / slope`` from the calibration's covariance alone."""
        if hu is None or self.covariance is None or not self.slope or not math.isfinite(hu):
            return None
        return bmd_sd_from_covariance(hu, self.slope, self.intercept, self.covariance)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``result.json``'s calibration details), without ``seconds``: the same study must give the
        same result and the same DICOM output UIDs, whatever the machine's speed."""
        d = asdict(self)
        d.pop("seconds", None)
        return d


def bmd_sd_from_covariance(hu: float, slope: float, intercept: float, covariance) -> float:
    """SD (mg/cm³) of ``BMD = (hu - intercept) / slope`` for a (slope, intercept) covariance ``(2, 2)``."""
    g = np.array([-(hu - intercept) / slope ** 2, -1.0 / slope])
    var = float(g @ np.asarray(covariance, dtype=np.float64) @ g)
    return math.sqrt(max(var, 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# Physics
# ---------------------------------------------------------------------------------------------------------------------
def _kvp_ok(kvp: float) -> float:
    """``kvp`` rounded to spekpy's 0.5 kV steps; ValueError outside the physics model's 80–140 kV."""
    k = round(float(kvp) * 2.0) / 2.0
    if not _KVP_RANGE[0] <= k <= _KVP_RANGE[1]:
        raise ValueError(f"kVp {kvp:g} outside the {_KVP_RANGE[0]:g}-{_KVP_RANGE[1]:g} kV of the physics model")
    return k


def physics_hu(kvp: float, al_mm: float, water_mm: float) -> Dict[str, float]:
    """HU of the reference tissues, the rod slope and the effective energy through one spectrum.

    Args:
        kvp: tube potential (kV, 80–140 in 0.5 kV steps).
        al_mm: filtration (mm Al).
        water_mm: hardening thickness (mm of water).

    Returns:
        ``{"air", "fat", "muscle", "blood", "cortical_bone": HU, "rod_slope": HU per mg/cm³ of K2HPO4 in water,
        "rod_zero": HU of the 0 mg/cm³ rod (water: 0), "effective_energy_kev"}``.
    """
    from bmd_d2.phantoms import physics

    spec = physics.tube_spectrum(kvp, al_mm=max(float(al_mm), 0.0), water_mm=max(float(water_mm), 0.0))
    mats = _materials()
    table = physics.hu_table(list(mats.values()), spec)
    lo, hi = mats["rod_0"].name, mats["rod_hi"].name
    return {"air": -1000.0, "fat": table[mats["fat"].name], "muscle": table[mats["muscle"].name],
            "blood": table[mats["blood"].name], "cortical_bone": table["cortical_bone"], "rod_zero": table[lo],
            "rod_slope": (table[hi] - table[lo]) / _ROD_MG,
            "effective_energy_kev": physics.effective_energy(spec)}


_MATERIAL_CACHE: Dict[str, Any] = {}


def _materials() -> Dict[str, Any]:
    """The reference materials (built once): ``fat`` ICRP adipose (0.92 g/cm³); ``muscle`` ICRU skeletal muscle with
    :data:`MUSCLE_FAT_FRACTION` of that fat by volume (the typical fat infiltration of adult paraspinal muscle);
    ``blood`` ICRU whole blood at the density of a hematocrit of :data:`HEMATOCRIT` (1.025 + 0.075 Hct g/cm³: plasma
    and red cells); ``cortical_bone`` ICRU 44; the 0 and 200 mg/cm³ K2HPO4-in-water rods."""
    if not _MATERIAL_CACHE:
        from bmd_d2.phantoms import physics

        M = physics.MATERIALS
        fat = physics.Material("ref_fat", M["adipose"].density, M["adipose"].composition)
        f = MUSCLE_FAT_FRACTION
        _MATERIAL_CACHE.update({
            "fat": fat,
            "muscle": physics.mix("ref_muscle", ((M["muscle"], (1.0 - f) * M["muscle"].density),
                                                 (fat, f * fat.density))),
            "blood": physics.Material("ref_blood", 1.025 + 0.075 * HEMATOCRIT, M["blood"].composition),
            "cortical_bone": M["cortical_bone"],
            "rod_0": physics.mineral_in("water", 0.0, name="rod_0"),
            "rod_hi": physics.mineral_in("water", _ROD_MG, name=f"rod_{_ROD_MG:g}"),
        })
    return _MATERIAL_CACHE


# ---------------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------------------------
_CROSS = ndimage.generate_binary_structure(2, 1)


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(math.floor(radius_px)), 0)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= radius_px * radius_px + 1e-9


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """float32 block means of ``img`` ``(J, I)`` over ``f × f`` blocks (edge rows/columns that do not fill a block are
    dropped)."""
    if f == 1:
        return img.astype(np.float32, copy=False)
    J, I = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    blocks = img[:J, :I].reshape(J // f, f, I // f, f)
    return blocks.sum(axis=3, dtype=np.float32).sum(axis=1) * np.float32(1.0 / (f * f))


def _robust(values: np.ndarray) -> Tuple[float, float, float]:
    """(mean, median, robust SD) of ``values``."""
    med = float(np.median(values))
    return float(values.mean()), med, float(1.4826 * np.median(np.abs(values - med)))


def _slice_lps(affine: np.ndarray, k: int, f: int, shape_ji: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """LPS x and y (mm) of the block centres of slice ``k``: float32 ``(J//f, I//f)`` each."""
    nj, ni = shape_ji
    i = (np.arange(ni) * f + (f - 1) / 2.0)[None, :]
    j = (np.arange(nj) * f + (f - 1) / 2.0)[:, None]
    a = np.asarray(affine, dtype=np.float64)
    X = a[0, 0] * i + a[0, 1] * j + (a[0, 2] * k + a[0, 3])
    Y = a[1, 0] * i + a[1, 1] * j + (a[1, 2] * k + a[1, 3])
    return X.astype(np.float32), Y.astype(np.float32)


def _slice_of_z(affine: np.ndarray, z: float, n_slices: int) -> Optional[int]:
    """Index of the slice nearest to LPS height ``z`` (axial volumes: z grows or falls with k), or None outside."""
    a = np.asarray(affine, dtype=np.float64)
    dz = a[2, 2]
    if abs(dz) < 1e-6:
        return None
    k = int(round((z - a[2, 3]) / dz))
    return k if 0 <= k < n_slices else None


def _pixel_mm(affine: np.ndarray) -> float:
    a = np.asarray(affine, dtype=np.float64)
    return float(math.sqrt(abs(np.linalg.det(a[:2, :2]))))


# ---------------------------------------------------------------------------------------------------------------------
# Spine
# ---------------------------------------------------------------------------------------------------------------------
def find_spine_points(volume_hu: np.ndarray, affine: np.ndarray, n: int = 6) -> np.ndarray:
    """Rough centres (LPS mm) of the vertebral bodies at ``n`` heights of the central 70 % of the scan.

    Per slice the bone (smoothed HU > 200) blob of at least 300 mm² nearest the patient's midline (body centroid)
    in the posterior half is taken as the vertebra; the body's centre is put 18 mm behind its most anterior point.
    Used when the measurement has no vertebra detections (standalone calls).

    Returns:
        float64 ``(M, 3)`` with ``M <= n`` (slices without a vertebra are skipped).
    """
    K = volume_hu.shape[0]
    ps = _pixel_mm(affine)
    f = max(1, int(_PIXEL_TARGET_MM / ps))
    out = []
    for k in np.unique(np.linspace(0.15 * (K - 1), 0.85 * (K - 1), n).round().astype(int)):
        a = _block_mean(volume_hu[int(k)], f)
        X, Y = _slice_lps(affine, int(k), f, a.shape)
        px = ps * f
        g = ndimage.gaussian_filter(a, 1.0)
        body = g > -400
        if body.sum() < 100:
            continue
        bx, by = float(X[body].mean()), float(Y[body].mean())
        lab, nb = ndimage.label(g > 200)
        if nb == 0:
            continue
        idx = np.arange(1, nb + 1)
        areas = ndimage.sum(np.ones_like(g), lab, idx) * px * px
        cx = np.asarray(ndimage.mean(X, lab, idx))
        cy = np.asarray(ndimage.mean(Y, lab, idx))
        cand = [(abs(cx[t] - bx) + 0.2 * abs(cy[t] - by - 40.0), t) for t in range(nb)
                if areas[t] >= 300.0 and cy[t] > by - 20.0]
        if not cand:
            continue
        t = min(cand)[1]
        sel = lab == t + 1
        y_ant = float(Y[sel].min())
        near = sel & (Y < y_ant + 30.0)
        out.append([float(X[near].mean()), y_ant + 18.0, float(
            np.asarray(affine, dtype=np.float64)[2, 2] * k + np.asarray(affine, dtype=np.float64)[2, 3])])
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# ROIs
# ---------------------------------------------------------------------------------------------------------------------
def water_equivalent_diameter(hu: np.ndarray, body: np.ndarray, pixel_mm: float) -> float:
    """AAPM TG 220 water-equivalent diameter (mm) of one axial slice: ``2 sqrt((1 + mean HU/1000) A / pi)`` over the
    patient ``body`` (bool, same shape as ``hu``) of area ``A``."""
    n = int(body.sum())
    if n == 0:
        return 0.0
    area = n * pixel_mm * pixel_mm
    return 2.0 * math.sqrt(max(1.0 + float(hu[body].mean()) / 1000.0, 0.0) * area / math.pi)


def _distinct(g: np.ndarray, blob: np.ndarray, px: float) -> bool:
    """Whether ``blob`` is a structure of its own: at least half of a 4 mm ring around it (1 pixel off its edge) reads
    40 HU or more away from the blob's median (a vessel in fat or beside bone, not a patch of uniform tissue)."""
    inner = ndimage.binary_dilation(blob, structure=_CROSS)
    ring = ndimage.binary_dilation(inner, structure=_disk(4.0 / px)) & ~inner
    if not ring.any():
        return False
    return float(np.mean(np.abs(g[ring] - np.median(g[blob])) >= 40.0)) >= 0.5


def _round_blob(mask: np.ndarray, g: np.ndarray, px: float, X, Y, target_xy, r_range=(6.0, 20.0),
                cut: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The roundest blob of ``mask`` (opened by 3 mm) with an inscribed radius within ``r_range`` mm, distinct from
    its surroundings in the smoothed HU ``g`` (:func:`_distinct`), nearest to ``target_xy``: bool mask of its pixels
    ≥ 3 mm inside its edge (None when there is none). Blobs touching ``cut`` (the edge of the search window) are
    pieces of something larger cut off by the window (a psoas muscle beside the body), never a vessel."""
    m = ndimage.binary_opening(mask, structure=_disk(3.0 / px))
    lab, n = ndimage.label(m)
    if n == 0:
        return None
    cut_off = set(np.unique(lab[cut & m]).tolist()) if cut is not None else set()
    dist = ndimage.distance_transform_edt(m) * px
    idx = np.arange(1, n + 1)
    r_in = np.asarray(ndimage.maximum(dist, lab, idx), dtype=np.float64)
    area = np.asarray(ndimage.sum(m, lab, idx), dtype=np.float64) * px * px
    cx = np.asarray(ndimage.mean(X, lab, idx))
    cy = np.asarray(ndimage.mean(Y, lab, idx))
    best, best_score = None, None
    for t in range(n):
        if t + 1 in cut_off or not r_range[0] <= r_in[t] <= r_range[1]:
            continue
        roundness = area[t] / (math.pi * r_in[t] ** 2)  # 1 for a disk (a little more: the pixelated maximum)
        if roundness > 2.2 or not _distinct(g, lab == t + 1, px):
            continue
        score = roundness + math.hypot(cx[t] - target_xy[0], cy[t] - target_xy[1]) / 30.0
        if best_score is None or score < best_score:
            best, best_score = t, score
    if best is None:
        return None
    inner = (lab == best + 1) & (dist >= 3.0)
    return inner if inner.any() else None


def _box(cond_rows: np.ndarray, cond_cols: np.ndarray, pad: int = 2) -> Optional[Tuple[slice, slice]]:
    """The bounding slices of the rows/columns where ``cond_rows``/``cond_cols`` (1-D bool) hold, padded."""
    r, c = np.nonzero(cond_rows)[0], np.nonzero(cond_cols)[0]
    if r.size == 0 or c.size == 0:
        return None
    return (slice(max(int(r[0]) - pad, 0), int(r[-1]) + pad + 1), slice(max(int(c[0]) - pad, 0), int(c[-1]) + pad + 1))


def _region_box(X: np.ndarray, Y: np.ndarray, x_range, y_range) -> Optional[Tuple[slice, slice]]:
    """Bounding slices of the pixels whose LPS ``X``/``Y`` lie in ``x_range``/``y_range`` (axial, axis-aligned or
    not: tested on the full coordinate maps' rows and columns)."""
    inside = (X >= x_range[0]) & (X <= x_range[1]) & (Y >= y_range[0]) & (Y <= y_range[1])
    return _box(inside.any(1), inside.any(0), pad=0)


def _air_values(a: np.ndarray, g: np.ndarray, px: float, circle: Optional[np.ndarray]) -> Tuple[np.ndarray, int]:
    """Air outside the patient: block means over ~4 mm blocks at least 10 mm from anything denser than -950 HU,
    inside ``circle`` and 5 mm from padding. Returns (values, original-grid voxels per value / this grid's)."""
    q = max(1, int(round(4.0 / px)))
    obj = _block_reduce(g > -950.0, q, np.max)
    pad = _block_reduce(g <= -1100.0, q, np.max)
    vals = _block_mean(a, q)
    pc = px * q
    air = ndimage.distance_transform_edt(~obj) * pc >= 10.0 if obj.any() else np.ones_like(obj)
    if pad.any():
        air &= ndimage.distance_transform_edt(~pad) * pc >= 5.0
    if circle is not None:
        air &= _block_reduce(circle, q, np.min)
    return vals[air], q * q


def _block_reduce(m: np.ndarray, q: int, fn) -> np.ndarray:
    """``fn`` (np.max / np.min) of bool ``m`` over ``q × q`` blocks (edge remainder dropped)."""
    if q == 1:
        return m
    J, I = (m.shape[0] // q) * q, (m.shape[1] // q) * q
    return fn(m[:J, :I].reshape(J // q, q, I // q, q), axis=(1, 3))


def _vertebral_body(g: np.ndarray, X: np.ndarray, Y: np.ndarray, spine_xy, px: float) -> Optional[np.ndarray]:
    """Bool mask of the vertebra at ``spine_xy``: the bone (smoothed HU > 150) blob at or within 15 mm of the spine
    point, filled between its extremes along every row and every column (the trabecular bone inside the cortex,
    whatever its density and even through a gap in the cortex); None when there is none."""
    lab, n = ndimage.label(g > 150.0)
    if n == 0:
        return None
    d = np.hypot(X - spine_xy[0], Y - spine_xy[1])
    near = (d <= 15.0) & (lab > 0)
    if not near.any():
        return None
    m = lab == lab[near][int(np.argmin(d[near]))]
    rows = np.maximum.accumulate(m, axis=1) & np.maximum.accumulate(m[:, ::-1], axis=1)[:, ::-1]
    cols = np.maximum.accumulate(m, axis=0) & np.maximum.accumulate(m[::-1], axis=0)[::-1]
    return m | (rows & cols)


def _slice_rois(a: np.ndarray, X: np.ndarray, Y: np.ndarray, px: float, spine_xy, circle) -> Dict[str, Any]:
    """ROI values of one block-averaged slice ``a`` (LPS coordinates ``X``, ``Y``; pixel ``px`` mm).

    Returns:
        ``{"air", "fat", "muscle", "blood", "enhanced": float32 value arrays (possibly empty), "air_weight": original
        voxels per air value / per other value, "wed": mm}``.
    """
    sx, sy = spine_xy
    g = ndimage.gaussian_filter(a, 1.0)
    out: Dict[str, Any] = {t: np.empty(0, np.float32) for t in (*TISSUES, "enhanced")}
    out["wed"], out["air_weight"] = 0.0, 1
    out["air"], out["air_weight"] = _air_values(a, g, px, circle)
    solid = ndimage.binary_opening(g > -400.0, structure=_CROSS)
    lab, n = ndimage.label(solid)
    if n == 0:
        return out
    # the patient: the blob holding the spine point (or nearest to it), else the largest
    jj, ii = np.unravel_index(int(np.argmin(np.abs(Y - sy) + np.abs(X - sx))), a.shape)
    t = lab[jj, ii]
    if t == 0:
        t = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    patient = lab == t
    bb = _box(patient.any(1), patient.any(0))
    a, g, X, Y = a[bb], g[bb], X[bb], Y[bb]
    body = ndimage.binary_fill_holes(patient[bb])
    out["wed"] = water_equivalent_diameter(a, body, px)
    depth = ndimage.distance_transform_edt(np.pad(body, 1)) [1:-1, 1:-1] * px
    # subcutaneous fat: fat-like pixels 2-45 mm inside the skin, connected to the skin
    fatlike = body & (g >= -200.0) & (g <= -40.0) & (depth <= 45.0)
    flab, fn = ndimage.label(fatlike)
    if fn:
        skin = np.unique(flab[(depth <= max(2.0, 1.5 * px) + px) & fatlike])
        keep = np.zeros(fn + 1, bool)
        keep[skin[skin > 0]] = True
        fat = ndimage.binary_erosion(keep[flab] & (depth >= 2.0), structure=_CROSS)
        out["fat"] = a[fat]
    # paraspinal muscle: posterior of the vertebral body, beside the spinous process, away from bone and skin
    mb = _region_box(X, Y, (sx - 75.0, sx + 75.0), (sy + 25.0, sy + 110.0))
    if mb is not None:
        am, gm, Xm, Ym, bm, dm = a[mb], g[mb], X[mb], Y[mb], body[mb], depth[mb]
        bone = gm > 250.0
        far_bone = ndimage.distance_transform_edt(~bone) * px >= 4.0 if bone.any() else np.ones_like(bone)
        dy, dx = Ym - sy, np.abs(Xm - sx)
        mus = bm & (dy >= 25.0) & (dy <= 110.0) & (dx >= 8.0) & (dx <= 75.0) & (dm >= 6.0) & far_bone
        mus = ndimage.binary_erosion(mus & (gm >= -20.0) & (gm <= 120.0), structure=_CROSS)
        mlab, mn = ndimage.label(mus)
        if mn:
            big = np.bincount(mlab.ravel()) * px * px >= 150.0
            big[0] = False
            out["muscle"] = am[big[mlab]]
    # aorta: a round blood-like (or enhanced) tube in front of the spine
    ab = _region_box(X, Y, (sx - 35.0, sx + 50.0), (sy - 100.0, sy + 5.0))
    if ab is not None:
        aa, ga, Xa, Ya, ba = a[ab], g[ab], X[ab], Y[ab], body[ab]
        vert = _vertebral_body(ga, Xa, Ya, (sx, sy), px)
        front = sy - 15.0
        if vert is not None:  # the body's anterior edge at the midline (the aorta may lie against it)
            mid = vert & (np.abs(Xa - sx) <= 10.0)
            front = float(Ya[mid if mid.any() else vert].min())
        window = (Ya >= front - 80.0) & (Ya <= front + 5.0) & (Xa - sx >= -35.0) & (Xa - sx <= 50.0)
        cut = window & ~ndimage.binary_erosion(window, structure=_CROSS, border_value=0)
        region = ba & window
        if vert is not None:  # never the vertebral body itself (low-density trabecular bone reads like blood)
            region &= ~ndimage.binary_dilation(vert, structure=_CROSS)
        target = (sx + 12.0, sy - 35.0)
        blood = _round_blob(region & (ga >= 0.0) & (ga <= 110.0), ga, px, Xa, Ya, target, r_range=(6.0, 16.0),
                            cut=cut)
        if blood is not None:
            out["blood"] = aa[blood]
        enh = _round_blob(region & (ga >= 130.0) & (ga <= 900.0), ga, px, Xa, Ya, target, r_range=(5.0, 20.0),
                          cut=cut)
        if enh is not None:
            out["enhanced"] = aa[enh]
    return out


def _with_neighbours(spine_lps: np.ndarray, min_points: int = 6, step_mm: float = 8.0) -> np.ndarray:
    """``spine_lps`` with, when it has fewer than ``min_points`` points, each point repeated ``step_mm`` above and
    below (within the same vertebra: bodies are 20-30 mm high), so a short scan still samples ~6 slices."""
    pts = np.asarray(spine_lps, dtype=np.float64).reshape(-1, 3)
    if len(pts) >= min_points or len(pts) == 0:
        return pts
    extra = [p + [0.0, 0.0, dz] for dz in (-step_mm, step_mm) for p in pts]
    return np.concatenate([pts, np.asarray(extra)])


def _consistent(parts: List[np.ndarray], tol_hu: float = 12.0) -> List[np.ndarray]:
    """The slices' ROI values whose median lies within ``tol_hu`` of the median of the slice medians (the aorta reads
    alike at every level; a slice where another structure was taken for it does not)."""
    if len(parts) < 2:
        return parts
    meds = np.array([float(np.median(v)) for v in parts])
    ref = float(np.median(meds))
    return [v for v, m in zip(parts, meds) if abs(m - ref) <= tol_hu]


def _choose_slices(volume_hu: np.ndarray, affine: np.ndarray, spine_lps: np.ndarray, metal_hu: float
                   ) -> Tuple[List[Tuple[int, Tuple[float, float]]], int]:
    """(slice index, spine (x, y)) per spine point, metal slices replaced by a clean one within 10 mm; and how many
    points only had metal slices."""
    K = volume_hu.shape[0]
    dz = abs(float(np.asarray(affine)[2, 2])) or 1.0
    reach = max(1, int(round(10.0 / dz)))
    chosen: List[Tuple[int, Tuple[float, float]]] = []
    used = set()
    metal_only = 0
    for x, y, z in np.asarray(spine_lps, dtype=np.float64).reshape(-1, 3):
        k0 = _slice_of_z(affine, z, K)
        if k0 is None:
            continue
        clean_taken = False
        for dk in sorted(range(-reach, reach + 1), key=abs):
            k = k0 + dk
            if not 0 <= k < K:
                continue
            if float(volume_hu[k].max()) >= metal_hu:
                continue
            if k in used:  # a clean slice another level already measures
                clean_taken = True
                continue
            chosen.append((k, (float(x), float(y))))
            used.add(k)
            break
        else:
            metal_only += 0 if clean_taken else 1
    return chosen, metal_only


def find_reference_rois(volume_hu: np.ndarray, affine: np.ndarray, spine_lps: np.ndarray, *,
                        metal_hu: float = 2000.0, contrast_hu: float = 120.0) -> Tuple[List[TissueROI], Dict[str, Any]]:
    """Locate and measure the reference tissues (module docstring, step 2) at the slices of ``spine_lps``.

    Args:
        volume_hu: ``(K, J, I)`` HU (int16 or float).
        affine: 4×4 ``(i, j, k, 1)`` → LPS mm (axial slices).
        spine_lps: ``(N, 3)`` LPS centres of vertebral bodies (one slice is measured per point).
        metal_hu: a slice holding a voxel at or above this is not used.
        contrast_hu: median HU of an enhanced aorta at or above which the scan counts as enhanced.

    Returns:
        ``(rois, info)``: one :class:`TissueROI` per :data:`TISSUES` (``used`` not yet decided: ``reason`` says when a
        tissue cannot be used) and ``info`` (``slices``, ``block``, ``pixel_mm``, ``wed_mm``, ``contrast``,
        ``metal_slices_skipped``, ``air_clipped``).
    """
    vol = np.asarray(volume_hu)
    K, J, I = vol.shape
    ps = _pixel_mm(affine)
    f = max(1, int(_PIXEL_TARGET_MM / ps))
    px = ps * f
    chosen, metal_only = _choose_slices(vol, affine, _with_neighbours(spine_lps), metal_hu)
    shape = (J // f, I // f)
    jj = (np.arange(shape[0]) * f + (f - 1) / 2.0)[:, None] - (J - 1) / 2.0
    ii = (np.arange(shape[1]) * f + (f - 1) / 2.0)[None, :] - (I - 1) / 2.0
    # the reconstruction circle (inscribed in a square matrix; a cropped, non-square volume has none to assume)
    circle = np.hypot(jj, ii) * ps <= min(I, J) * ps / 2.0 - 10.0 if I == J else None
    values: Dict[str, List[np.ndarray]] = {t: [] for t in (*TISSUES, "enhanced")}
    air_weight = 1
    weds, n_enh, enh_hu = [], 0, []
    for k, xy in chosen:
        a = _block_mean(vol[k], f)
        X, Y = _slice_lps(affine, k, f, a.shape)
        r = _slice_rois(a, X, Y, px, xy, circle)
        if r["wed"] > 0:
            weds.append(r["wed"])
        air_weight = r["air_weight"]
        for t in values:
            if r[t].size:
                values[t].append(r[t])
        if r["enhanced"].size >= 10:
            med = float(np.median(r["enhanced"]))
            if med >= contrast_hu:
                n_enh += 1
                enh_hu.append(med)
    values["blood"] = _consistent(values["blood"])
    info: Dict[str, Any] = {"slices": [int(k) for k, _ in chosen], "block": f, "pixel_mm": px,
                            "metal_slices_skipped": int(metal_only), "wed_mm_per_slice": [float(w) for w in weds],
                            "wed_mm": float(np.median(weds)) if weds else None}
    rois = []
    vmin = float(vol.min()) if vol.size else 0.0
    for t in TISSUES:
        roi = TissueROI(t)
        parts = values[t]
        if parts:
            v = np.concatenate(parts).astype(np.float64)
            roi.voxels, roi.slices = int(v.size * f * f * (air_weight if t == "air" else 1)), len(parts)
            roi.mean_hu, roi.median_hu, roi.robust_sd_hu = _robust(v)
            if t == "air" and roi.median_hu <= vmin + 3.0:
                roi.reason = f"clipped at the storage minimum ({vmin:.0f} HU)"
                info["air_clipped"] = True
        area = roi.voxels * ps * ps
        enough_area = area >= MIN_AREA_MM2[t] and sum(x.size for x in parts) >= MIN_BLOCK_VALUES
        if roi.voxels < MIN_VOXELS[t] and not enough_area and not roi.reason:
            roi.reason = (f"too few voxels ({roi.voxels} < {MIN_VOXELS[t]}; {area:.0f} mm² < "
                          f"{MIN_AREA_MM2[t]:g} mm²)")
        rois.append(roi)
    enhanced = bool(chosen) and 2 * n_enh >= len(chosen) and n_enh > 0
    blood = next(r for r in rois if r.name == "blood")
    high_blood = blood.median_hu is not None and blood.median_hu > 80.0
    info["contrast"] = {"enhanced": enhanced or high_blood, "slices_with_enhanced_aorta": n_enh,
                        "enhanced_aorta_hu": float(np.median(enh_hu)) if enh_hu else None,
                        "unenhanced_blood_above_range": bool(high_blood)}
    if enhanced or high_blood:
        blood.reason = "contrast" if enhanced else "above the unenhanced blood range (> 80 HU): contrast"
    return rois, info


# ---------------------------------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------------------------------
def _tissue_sd(name: str, contrast: bool) -> float:
    """The fit's weight of tissue ``name`` as an SD (HU): :data:`TISSUE_SD_HU`, muscle doubled under contrast."""
    return TISSUE_SD_HU[name] * (2.0 if contrast and name == "muscle" else 1.0)


def _priors(water_mm: float) -> Tuple[np.ndarray, np.ndarray]:
    """Prior means and SDs of (offset, gain, al_mm, water_mm) for a hardening thickness ``water_mm``."""
    return (np.array([_PRIOR_OFFSET[0], _PRIOR_GAIN[0], _PRIOR_AL[0], water_mm]),
            np.array([_PRIOR_OFFSET[1], _PRIOR_GAIN[1], _PRIOR_AL[1], max(_PRIOR_WATER_REL * water_mm, 10.0)]))


def _mixture(weights: np.ndarray, lines: np.ndarray, covs: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean line and covariance of lines ``(n, 2)`` (covariances ``(2, 2)`` each) mixed with ``weights`` (sum 1):
    the weighted mean, and the weighted covariances plus the spread of the lines about that mean."""
    mean = (weights[:, None] * lines).sum(0)
    cov = sum(wi * (c + np.outer(li - mean, li - mean)) for wi, c, li in zip(weights, covs, lines))
    return mean, cov


def _fit_one_kvp(kvp: float, meas: np.ndarray, sd: np.ndarray, names: Sequence[str], water0: float):
    """MAP fit of (offset, gain, al_mm, water_mm) at one kVp. Returns (theta, cov, chi2_data, model_fn)."""
    from scipy.optimize import least_squares

    prior_mu, prior_sd = _priors(water0)

    def model(theta):
        ph = physics_hu(kvp, theta[2], theta[3])
        return theta[0] + theta[1] * np.array([ph[n] for n in names]), ph

    def resid(theta):
        pred, _ = model(theta)
        return np.concatenate([(meas - pred) / sd, (theta - prior_mu) / prior_sd])

    lo = np.array([-200.0, 0.5, _BOUNDS_AL[0], 0.0])
    hi = np.array([200.0, 2.0, _BOUNDS_AL[1], 800.0])
    x0 = np.clip(prior_mu, lo + 1e-6, hi - 1e-6)
    sol = least_squares(resid, x0, bounds=(lo, hi), method="trf", diff_step=1e-3, x_scale=prior_sd)
    J = sol.jac
    cov = np.linalg.pinv(J.T @ J)
    r = sol.fun[:len(names)]
    chi2 = float(r @ r)
    return sol.x, cov, chi2, float(2.0 * sol.cost), model


def _line(kvp: float, theta: np.ndarray) -> np.ndarray:
    """(slope, intercept) of the K2HPO4 rod line for parameters ``theta``."""
    ph = physics_hu(kvp, theta[2], theta[3])
    return np.array([theta[1] * ph["rod_slope"], theta[0] + theta[1] * ph["rod_zero"]])


def _line_cov(kvp: float, theta: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Covariance ``(2, 2)`` of (slope, intercept) from the parameters' covariance (numerical Jacobian)."""
    steps = np.array([0.1, 1e-3, 0.05, 1.0])
    G = np.empty((2, 4))
    for i, h in enumerate(steps):
        up, dn = theta.copy(), theta.copy()
        up[i] += h
        dn[i] -= h
        G[:, i] = (_line(kvp, up) - _line(kvp, dn)) / (2 * h)
    return G @ cov @ G.T


def fit_reference_tissues(rois: Sequence[TissueROI], *, wed_mm: float, kvp: Optional[float] = None,
                          hardening_fraction: float = 1.0, contrast: bool = False
                          ) -> Tuple[SpectrumFit, np.ndarray, np.ndarray]:
    """Fit the spectrum and HU scale to the usable ROIs (module docstring, step 4) and derive the rod line (step 5).

    Args:
        rois: measured tissues; those with a ``reason`` are not fitted.
        wed_mm: the patient's water-equivalent diameter (mm).
        kvp: the DICOM KVP (None: fitted over 80–140 kV).
        hardening_fraction: the prior hardening thickness is this × ``wed_mm``.
        contrast: a contrast-enhanced scan (muscle, which enhances a little, weighs half).

    Returns:
        ``(fit, line, line_cov)``: the :class:`SpectrumFit`, ``[slope, intercept]`` and its ``(2, 2)`` covariance.
        ROIs get ``physics_hu``/``residual_hu``; ``used`` is set for the fitted ones.

    Raises:
        ValueError: fewer than two usable tissues, no fat, a kVp outside 80–140 kV.
    """
    usable = [r for r in rois if not r.reason and r.median_hu is not None]
    names = [r.name for r in usable]
    if "fat" not in names:
        raise ValueError("no usable subcutaneous fat")
    if not ({"muscle", "blood"} & set(names)):
        raise ValueError("neither paraspinal muscle nor aortic blood usable")
    meas = np.array([r.median_hu for r in usable])
    sd = np.array([math.hypot(_tissue_sd(r.name, contrast), (r.robust_sd_hu or 0.0) / math.sqrt(max(r.voxels, 1)))
                   for r in usable])
    water0 = max(float(hardening_fraction) * float(wed_mm), 50.0)
    kvps = {_kvp_ok(kvp): 1.0} if kvp else _KVPS_UNKNOWN
    fits, costs = [], []
    for k in kvps:
        theta, cov, chi2, cost, model = _fit_one_kvp(k, meas, sd, names, water0)
        fits.append((k, theta, cov, chi2, model))
        costs.append(cost)
    costs = np.array(costs)
    w = np.array(list(kvps.values())) * np.exp(-0.5 * (costs - costs.min()))  # prior x likelihood (priors included)
    w /= w.sum()
    lines = np.array([_line(f[0], f[1]) for f in fits])
    covs = []
    for (k, theta, cov, chi2, _m) in fits:
        scale = max(1.0, chi2 / max(len(names) - 1, 1))  # a fit worse than its tissues' spread widens the errors
        covs.append(_line_cov(k, theta, cov * scale))
    mean_line, line_cov = _mixture(w, lines, covs)
    best = int(np.argmax(w))
    k, theta, cov, chi2, model = fits[best]
    pred, ph = model(theta)
    scale = max(1.0, chi2 / max(len(names) - 1, 1))
    psd = np.sqrt(np.clip(np.diag(cov * scale), 0, None))
    for r in rois:
        r.used = r in usable
        phys = ph.get(r.name)
        r.physics_hu = float(theta[0] + theta[1] * phys) if phys is not None else None
        r.residual_hu = (float(r.median_hu - r.physics_hu) if r.median_hu is not None and r.physics_hu is not None
                         else None)
    fit = SpectrumFit(kvp=k, kvp_source="tag" if kvp else "fitted", al_mm=float(theta[2]), al_mm_sd=float(psd[2]),
                      water_mm=float(theta[3]), water_mm_sd=float(psd[3]), wed_mm=float(wed_mm),
                      effective_energy_kev=float(ph["effective_energy_kev"]), offset=float(theta[0]),
                      offset_sd=float(psd[0]), gain=float(theta[1]), gain_sd=float(psd[1]), chi2=float(chi2),
                      tissues=len(names),
                      kvp_weights={} if kvp else {f"{f[0]:g}": float(wi) for f, wi in zip(fits, w)})
    return fit, mean_line, line_cov


#: Hardening thickness (mm water) of the nominal line when the patient outline was not found (an average adult
#: abdomen's water-equivalent diameter).
NOMINAL_WED_MM = 300.0


def nominal_line(kvp: Optional[float], wed_mm: Optional[float] = None
                 ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """The rod line a typical scanner gives with no tissue to fit it to: the fit's priors themselves (offset 0 ± 4 HU,
    gain 1 ± 0.01, filtration 7.5 ± 4 mm Al, hardening by the WED ± 12 %) at the tagged kVp, or averaged over
    80–140 kV by the clinical prior without a tag. The fallback of a study whose reference tissues cannot be used:
    far closer than a generic line (at 80 kVp the rod reads ~1.6 HU per mg/cm³, at 140 kVp ~1.0), and its SD says
    how loose it is.

    Args:
        kvp: the DICOM KVP (None: unknown).
        wed_mm: the patient's water-equivalent diameter (None: :data:`NOMINAL_WED_MM`).

    Returns:
        ``(line, line_cov, info)``: ``[slope, intercept]``, its ``(2, 2)`` covariance and what was assumed.

    Raises:
        ValueError: a kVp outside 80–140 kV.
    """
    water = max(float(wed_mm) if wed_mm else NOMINAL_WED_MM, 50.0)
    kvps = {_kvp_ok(kvp): 1.0} if kvp else _KVPS_UNKNOWN
    theta, prior_sd = _priors(water)
    prior_cov = np.diag(np.square(prior_sd))
    w = np.array(list(kvps.values()), dtype=np.float64)
    w /= w.sum()
    mean, cov = _mixture(w, np.array([_line(k, theta) for k in kvps]), [_line_cov(k, theta, prior_cov) for k in kvps])
    info = {"kvp": float(next(iter(kvps))) if kvp else None, "kvp_source": "tag" if kvp else "prior",
            "al_mm": float(_PRIOR_AL[0]), "water_mm": float(water),
            "water_source": "wed" if wed_mm else "nominal"}
    return mean, cov, info


def _implausible(fit: SpectrumFit) -> Optional[str]:
    """Why the fitted spectrum / scale is outside the physical range, or None."""
    for key, (lo, hi) in _PLAUSIBLE.items():
        v = getattr(fit, key)
        if not lo <= v <= hi:
            return f"fitted {key} {v:.3g} outside {lo:g}..{hi:g}"
    if not _BOUNDS_AL[0] + 0.05 < fit.al_mm < _BOUNDS_AL[1] - 0.05:
        return f"fitted filtration {fit.al_mm:.2g} mm Al at the edge of {_BOUNDS_AL[0]:g}..{_BOUNDS_AL[1]:g} mm"
    return None


def internal_calibration(volume_hu: np.ndarray, affine: np.ndarray, *, kvp: Optional[float] = None,
                         spine_lps: Optional[np.ndarray] = None, metal_hu: float = 2000.0,
                         contrast_hu: float = 120.0, hardening_fraction: float = 1.0) -> InternalCalibration:
    """The study's HU → BMD line (K2HPO4-equivalent mg/cm³) from its own air, fat, muscle and blood.

    Args:
        volume_hu: ``(K, J, I)`` HU (int16 or float32) of axial slices.
        affine: 4×4 ``(i, j, k, 1)`` → LPS mm.
        kvp: the DICOM ``KVP`` (kV); None fits it.
        spine_lps: ``(N, 3)`` LPS centres of the vertebral bodies (e.g. the detected ones); None looks for the spine
            (:func:`find_spine_points`).
        metal_hu: HU from which a voxel is metal (its slice is not used).
        contrast_hu: an aorta with median HU at or above this means contrast (blood not used).
        hardening_fraction: prior hardening thickness = this × the patient's water-equivalent diameter.

    Returns:
        The :class:`InternalCalibration`; ``ok`` False (with ``reason``) when it must not be used. Never raises for
        an image it cannot use.
    """
    t0 = time.perf_counter()
    vol = np.asarray(volume_hu)
    res = InternalCalibration(ok=False)
    spine_source = "given"
    if spine_lps is None or len(spine_lps) == 0:
        spine_lps = find_spine_points(vol, affine) if vol.ndim == 3 and vol.shape[0] > 0 else np.empty((0, 3))
        spine_source = "searched"
    spine_lps = np.asarray(spine_lps, dtype=np.float64).reshape(-1, 3)
    if vol.ndim != 3 or len(spine_lps) == 0:
        res.reason = "no vertebral level to measure the reference tissues at"
        res.seconds = time.perf_counter() - t0
        return res
    rois, info = find_reference_rois(vol, affine, spine_lps, metal_hu=metal_hu, contrast_hu=contrast_hu)
    info["spine_source"] = spine_source
    res.rois, res.info = rois, info
    if info["contrast"]["enhanced"]:
        res.flags.append("calibration_contrast")
    if info["metal_slices_skipped"]:
        res.flags.append("calibration_metal")
    try:
        if not info["slices"]:
            raise ValueError("metal in every slice at the vertebral levels" if info["metal_slices_skipped"]
                             else "no slice at the vertebral levels")
        if not info.get("wed_mm"):
            raise ValueError("no patient outline found")
        opts = dict(wed_mm=info["wed_mm"], kvp=kvp, hardening_fraction=hardening_fraction,
                    contrast=bool(info["contrast"]["enhanced"]))
        fit, line, cov = fit_reference_tissues(rois, **opts)

        def off(r):  # residual in units of the tissue's weight
            return abs(r.residual_hu) / _tissue_sd(r.name, opts["contrast"])

        # a tissue far off the fit is dropped once and the fit repeated
        worst = max((r for r in rois if r.used), key=off)
        n_used = sum(r.used for r in rois)
        if off(worst) > _MAX_RESIDUAL_SD and n_used > 2:
            worst.reason = f"outlier ({worst.residual_hu:+.1f} HU off the fit)"
            fit, line, cov = fit_reference_tissues(rois, **opts)
        res.fit = fit
        res.slope, res.intercept = float(line[0]), float(line[1])
        res.covariance = cov.tolist()
        res.slope_sd, res.intercept_sd = float(math.sqrt(max(cov[0, 0], 0))), float(math.sqrt(max(cov[1, 1], 0)))
        bad = [r for r in rois if r.used and off(r) > _MAX_RESIDUAL_SD]
        if bad:
            raise ValueError(f"{bad[0].name} {bad[0].residual_hu:+.1f} HU off the fit")
        why = _implausible(fit)
        if why:
            raise ValueError(why)
        if not res.slope > 0:
            raise ValueError(f"non-positive slope {res.slope:.3g}")
        res.ok = True
    except ValueError as e:
        res.reason = str(e)
    res.seconds = time.perf_counter() - t0
    return res
