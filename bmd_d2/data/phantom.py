"""Synthetic lumbar-spine CT phantoms whose vertebral BMD is known by construction.

This module renders a CT study (HU volume + geometry), its vertebral-body and trabecular-core label volumes, and the
true BMD of each vertebra; it writes the study as a CT DICOM series (pydicom), NIfTI label volumes (nibabel), a
preview PNG and a JSON record of every random parameter. It imports no detectron2.

Ground truth (the contract every consumer relies on)
----------------------------------------------------
* ``bmd_mg_cm3``: a vertebra's BMD is the **mean mineral density of its trabecular core**. The density field inside
  the core is textured (filtered noise, basivertebral vein) and is shifted so that its mean over the core voxels
  (``cores.nii.gz == label``) equals the drawn BMD exactly.
* ``trabecular_hu``: the mean HU over the same core voxels of the image **as written to DICOM without noise**: after
  the scanner calibration ``HU = a + b * density``, partial volume and PSF blur, before noise and quantisation. It
  therefore differs slightly from ``a + b * bmd`` near the cortical shell (partial volume is part of the physics a
  measurement must handle); ``phantom.json`` records ``a``, ``b`` and ``a + b * bmd`` per level. Reading the DICOM back
  and averaging the core gives ``trabecular_hu`` up to the noise (σ / sqrt(N) with correlated noise) and
  quantisation (``RescaleSlope / 2``).
* ``labels.nii.gz``: vertebral bodies (cortical shell + core, partial-volume fraction ≥ 0.5), values from
  :mod:`bmd_d2.data.levels` (T11 = 1 … S1 = 8). ``cores.nii.gz``: trabecular cores (fraction ≥ 0.5, minus voxels within
  2 mm of metal), same values. A level is labelled (and listed in ``bmd.csv``) when at least half of its body height
  lies inside the scanned range.

Coordinates
-----------
Patient coordinates are DICOM LPS millimetres (x → patient left, y → posterior, z → superior). The in-memory volume is
``(K, J, I)`` = (slice, row, column) with ``affine`` mapping ``(i, j, k, 1)`` → LPS; slices are stored inferior →
superior (``k`` grows with ``z``). DICOM slices use ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``. NIfTI files are
RAS: their affine is ``diag(-1, -1, 1, 1) @ affine`` and their data array is indexed ``(i, j, k)`` (the transpose of the
in-memory array), so ``nibabel.load(...).affine`` maps the same voxels to the same physical points.

Physics (ranges, all drawn per study unless fixed in :class:`PhantomOptions`)
-----------------------------------------------------------------------------
* BMD: patient mean drawn across the ACR categories (osteoporosis < 80, osteopenia 80–120, normal > 120 mg/cm³)
  within 30–250 mg/cm³; level-to-level variation ±6 % (1 σ); a fractured vertebra is 5–20 % denser (compaction).
* Calibration ``HU = a + b * density``: ``a`` ∈ [-10, 30] HU, ``b`` ∈ [0.8, 1.25] HU per mg/cm³ (higher at low kVp).
* Cortical shell 0.5–1.5 mm of 600–1000 mg/cm³, superior/inferior endplates 1–2 mm at 0.4–0.8 × that density;
  posterior elements: a cortical shell of 0.8–1.6 mm around a cancellous core of 0.9–1.4 × BMD + 30 mg/cm³.
  Trabecular core: anisotropic filtered-noise texture (relative SD grows as BMD falls), a basivertebral vein, and
  0–4 sclerotic islands per level on average (Ø 2–5 mm, +150–400 mg/cm³: the heavy bright tail of real trabecular
  HU); the core mean is then set to the level's BMD exactly.
* Soft tissue (HU, before noise): fat −110…−85, muscle 10–60 (low end: fat-infiltrated), disc 55–100, CSF 5–15, aorta 35–50 or 150–350 with
  contrast, liver 50–65 (90–130), kidney 25–35 (140–200), metal 3000–6000 (clipped by 12-bit storage to 3071).
* Partial volume: analytic; every edge is a linear ramp whose width is the voxel footprint (pixel spacing in-plane,
  slice *thickness* through-plane) projected on the edge normal. PSF: in-plane Gaussian σ 0.35–0.8 mm.
* Noise: correlated Gaussian (filtered white noise), σ 8–30 HU at 2.5 mm scaled by sqrt(2.5 / thickness).
* Geometry: slice thickness 0.625–3 mm (spacing = thickness, or overlapping), pixel spacing 0.5–0.98 mm, matrix 512;
  15 % of studies are coarse in-plane reconstructions (1.5–3 mm pixels, matrix reduced to keep the field of view);
  vertebral-body size ×0.88–1.25 of a base L3 of 46 mm (lateral) × 35.5 mm (AP); patient / table / reconstruction-centre offsets, lordosis scaled 0.4–1.3, scoliosis ≤ 8°, axial rotation, 8 %
  compression fractures, 6 % pedicle screws with rods.

Speed: vertebrae are rendered in small boxes around each structure, the soft-tissue background on anchor slices
every few mm (interpolated), and the noise from a bank of pre-filtered noise slices, so a 512² × 300 study renders in
a few seconds on one core.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .levels import LEVELS, LEVEL_TO_LABEL

logger = logging.getLogger(__name__)

__all__ = [
    "PhantomOptions",
    "PhantomStudy",
    "DicomStyle",
    "study_seed",
    "study_id_for",
    "generate_study",
    "write_study",
    "write_dicom_series",
    "write_bmd_csv",
    "generate_dataset",
    "TRANSFER_SYNTAXES",
    "CSV_FIELDS",
]

CSV_FIELDS = ("study_id", "level", "bmd_mg_cm3", "trabecular_hu")

# name -> pydicom UID name; "explicit"/"implicit" are native, the rest go through pydicom's encoders.
TRANSFER_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "implicit": "ImplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpegls": "JPEGLSLossless",
    "j2k": "JPEG2000Lossless",
}

# Per-level base anatomy (adult, mm): body height, AP depth, lateral width; disc height below the level.
# Version of the rendering (bumped when the same seed gives a different study): 1 first release; 2 realism (sizes,
# cortex, endplates, discs, muscle, islands, coarse pixels); 3 endplate density, body depth; 4 ring-shaped posterior
# elements. Written to phantom.json as ``generator_version``.
GENERATOR_VERSION = 4

_BASE_HEIGHT = np.array([23.0, 24.0, 25.5, 26.5, 27.5, 27.5, 27.0, 28.0])
_BASE_DEPTH = np.array([29.0, 31.0, 33.0, 34.0, 35.5, 36.0, 35.0, 34.0])
_BASE_WIDTH = np.array([37.0, 40.0, 42.0, 44.0, 46.0, 48.0, 50.0, 48.0])
_BASE_DISC = np.array([6.0, 7.0, 8.5, 9.5, 10.0, 10.5, 9.0])  # T11/T12 … L5/S1
# Sagittal tilt of each level's superior axis (deg, + = towards anterior): lumbar lordosis, sacral slope at S1.
_BASE_TILT = np.array([-10.0, -8.0, -6.0, -2.0, 2.0, 8.0, 16.0, 32.0])
_THICKNESSES = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
_THICKNESS_P = (0.1, 0.25, 0.15, 0.1, 0.15, 0.1, 0.15)
_KVPS = (80.0, 100.0, 120.0, 140.0)
_KVP_P = (0.1, 0.25, 0.5, 0.15)


# ----------------------------------------------------------------------------------------------------------- options
@dataclass
class PhantomOptions:
    """What to generate. ``None`` means "draw at random per study"; a value fixes it for every study.

    Random draws are made in a fixed order whatever the options, so fixing one option never changes the others.

    Attributes:
        matrix: rows = columns of each slice (512 for clinical studies; 64–128 for tests).
        pixel_spacing: mm per pixel in-plane (random 0.5–0.98, or 1.5–3.0 for 15 % of studies, whose matrix then
            shrinks to keep the field of view; fixing it disables the coarse share).
        slice_thickness: reconstructed thickness in mm (random from 0.625–3).
        slice_spacing: mm between slice centres (random: = thickness, or 50–100 % of it when overlapping).
        max_slices: cap on the number of slices; the top of the scan range is cut to respect it.
        noise_sd: noise σ in HU (random 8–30 HU at 2.5 mm, scaled by sqrt(2.5/thickness)); 0 disables noise.
        psf_sigma_mm: in-plane Gaussian PSF σ in mm (random 0.35–0.8); 0 disables blur.
        bmd_mg_cm3: patient mean BMD (random across ACR categories within 30–250).
        contrast: iodinated contrast in aorta / kidneys / liver (random 40 %).
        table: patient table in the field of view (random 80 %).
        fracture: force (True) or forbid (False) one compression fracture (random 8 %).
        metal: force or forbid pedicle screws and rods (random 6 %).
        scoliosis: allow scoliosis / axial rotation (False: straight coronal alignment).
        storage: "signed" (int16) or "unsigned" (uint16) pixel storage.
        rescale: (slope, intercept) pair (random among common vendor choices fitting ``storage``).
        bits_stored: 12 or 16 (12 only with unsigned storage; HU then saturates at intercept + 4095·slope).
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES` keys (random, 50 % uncompressed).
        shuffle_names: random file names instead of ``IM00001.dcm`` in instance order.
        reverse_instances: InstanceNumber 1 at the top (superior) slice instead of the bottom one.
        fov_padding: pixels outside the reconstruction circle set to a padding value (-3024 HU, signed storage only).
        optional_tags: write optional tags (SliceLocation, SpacingBetweenSlices, WindowCenter/Width).
        preview: write ``preview.png`` with :func:`write_study`.
        rescan_seed: None for the study itself; an integer gives a *re-scan* of the same patient on the same scanner
            (for precision studies): every anatomy, BMD, scanner and protocol parameter is kept, while the noise, the
            patient position (body and reconstruction-centre offsets, table z) and the start of the scan range are
            redrawn from ``(seed, rescan_seed)``. Each core's mean density still equals the drawn BMD exactly; the
            voxel-level trabecular texture is re-sampled on the shifted grid (a slightly pessimistic re-scan).
    """

    matrix: int = 512
    pixel_spacing: Optional[float] = None
    slice_thickness: Optional[float] = None
    slice_spacing: Optional[float] = None
    max_slices: int = 400
    noise_sd: Optional[float] = None
    psf_sigma_mm: Optional[float] = None
    bmd_mg_cm3: Optional[float] = None
    contrast: Optional[bool] = None
    table: Optional[bool] = None
    fracture: Optional[bool] = None
    metal: Optional[bool] = None
    scoliosis: bool = True
    storage: Optional[str] = None
    rescale: Optional[Tuple[float, float]] = None
    bits_stored: Optional[int] = None
    transfer_syntax: Optional[str] = None
    shuffle_names: Optional[bool] = None
    reverse_instances: Optional[bool] = None
    fov_padding: Optional[bool] = None
    optional_tags: Optional[bool] = None
    preview: bool = True
    rescan_seed: Optional[int] = None

    @classmethod
    def tiny(cls, **overrides) -> "PhantomOptions":
        """Small, fast studies for tests: 96² matrix of 2 mm pixels, 3 mm slices, plain uncompressed DICOM."""
        base = dict(
            matrix=96, pixel_spacing=2.0, slice_thickness=3.0, slice_spacing=3.0, storage="signed",
            rescale=(1.0, -1024.0), bits_stored=16, transfer_syntax="explicit", shuffle_names=False,
            reverse_instances=False, fov_padding=False, optional_tags=True,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible combinations (checked before any rendering)."""
        if self.matrix < 32:
            raise ValueError(f"matrix must be >= 32, got {self.matrix}")
        if self.storage not in (None, "signed", "unsigned"):
            raise ValueError(f"storage must be 'signed' or 'unsigned', got {self.storage!r}")
        if self.transfer_syntax not in (None, *TRANSFER_SYNTAXES):
            raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {self.transfer_syntax!r}")
        if self.bits_stored not in (None, 12, 16):
            raise ValueError(f"bits_stored must be 12 or 16, got {self.bits_stored}")
        if self.bits_stored == 12 and self.storage == "signed":
            raise ValueError("bits_stored=12 is only offered with unsigned storage")
        if self.fov_padding and self.storage == "unsigned":
            raise ValueError("fov_padding needs signed storage (the padding value -3024 HU is negative)")
        if self.rescan_seed is not None and (not isinstance(self.rescan_seed, (int, np.integer))
                                             or isinstance(self.rescan_seed, bool) or self.rescan_seed < 0):
            raise ValueError(f"rescan_seed must be None or a non-negative integer, got {self.rescan_seed!r}")


@dataclass
class DicomStyle:
    """How a study's DICOM series is encoded (all choices decode to the same HU up to ``slope / 2``)."""

    storage: str = "signed"
    slope: float = 1.0
    intercept: float = -1024.0
    bits_stored: int = 16
    transfer_syntax: str = "explicit"
    shuffle_names: bool = False
    reverse_instances: bool = False
    fov_padding: bool = False
    optional_tags: bool = True

    @property
    def hu_range(self) -> Tuple[float, float]:
        """(min, max) HU representable with this storage, bits and rescale."""
        if self.storage == "signed":
            lo, hi = -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        else:
            lo, hi = 0, 2 ** self.bits_stored - 1
        return lo * self.slope + self.intercept, hi * self.slope + self.intercept


@dataclass
class PhantomStudy:
    """An in-memory phantom study.

    Attributes:
        study_id: identifier used for folder names and in ``bmd.csv``.
        seed: the integer seed the study was drawn from.
        hu: float32 ``(K, J, I)`` HU as it will be written (noise included, not yet quantised).
        affine: float64 ``(4, 4)`` voxel ``(i, j, k, 1)`` → LPS mm.
        labels: uint8 ``(K, J, I)`` vertebral bodies, values from :mod:`bmd_d2.data.levels`.
        cores: uint8 ``(K, J, I)`` trabecular cores (ground-truth BMD region), same values.
        truth: one dict per labelled level, cranial → caudal: ``level``, ``label``, ``bmd_mg_cm3``, ``trabecular_hu``,
            ``calibrated_hu`` (a + b·bmd), ``core_voxels``, ``body_voxels``, ``in_view``, ``fractured``, ``metal``.
        params: every random parameter (JSON-serialisable), written as ``phantom.json``.
        style: the DICOM encoding of this study.
        slice_thickness: mm.
    """

    study_id: str
    seed: int
    hu: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    cores: np.ndarray
    truth: List[Dict]
    params: Dict
    style: DicomStyle
    slice_thickness: float

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """(dk, dj, di) voxel spacing in mm, array-axis order."""
        return (float(self.affine[2, 2]), float(self.affine[1, 1]), float(self.affine[0, 0]))

    def quantized_hu(self) -> np.ndarray:
        """float32 ``(K, J, I)``: the HU a DICOM reader gets back (stored values × slope + intercept)."""
        return _store(self.hu, self.style).astype(np.float32) * self.style.slope + self.style.intercept


# ------------------------------------------------------------------------------------------------------------ seeds
EXAMPLE_SEED = 20261125


def example_options() -> "PhantomOptions":
    """The options of the bundled example study (``tools/demo.py``): a 512² CT at 1.25 mm, BMD about 105 mg/cm³,
    no fracture, metal or contrast; generated with :data:`EXAMPLE_SEED`."""
    return PhantomOptions(slice_thickness=1.25, slice_spacing=1.25, pixel_spacing=0.78, bmd_mg_cm3=105.0,
                          fracture=False, metal=False, contrast=False, transfer_syntax="explicit")


def study_seed(base_seed: int, index: int) -> int:
    """Deterministic 63-bit seed of study ``index`` of a dataset drawn with ``base_seed``."""
    ss = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def study_id_for(index: int, prefix: str = "phantom") -> str:
    """Folder / CSV identifier of study ``index``: ``phantom_00042``."""
    return f"{prefix}_{index:05d}"


# ------------------------------------------------------------------------------------------------------- geometry
class _Grid:
    """Voxel grid helper: boxes around rotated structures and their local coordinates (float32)."""

    def __init__(self, shape: Tuple[int, int, int], origin: np.ndarray, spacing_xyz: np.ndarray, thickness: float):
        self.shape = shape  # (K, J, I)
        self.origin = origin.astype(np.float64)  # LPS of voxel (0, 0, 0)
        self.sp = spacing_xyz.astype(np.float64)  # (dx, dy, dz)
        self.footprint = np.array([self.sp[0], self.sp[1], thickness])  # voxel extent for partial volume
        self.x = (self.origin[0] + self.sp[0] * np.arange(shape[2])).astype(np.float32)
        self.y = (self.origin[1] + self.sp[1] * np.arange(shape[1])).astype(np.float32)
        self.z = (self.origin[2] + self.sp[2] * np.arange(shape[0])).astype(np.float32)

    def width(self, normal: np.ndarray) -> float:
        """Partial-volume ramp width (mm) of an edge with unit ``normal`` (LPS): voxel footprint projected on it."""
        return float(np.sqrt(np.sum((np.asarray(normal) * self.footprint) ** 2)))

    def box_points(self, pts: np.ndarray, margin_mm: float = 2.0) -> Optional[Tuple[slice, slice, slice]]:
        """Index box (k, j, i slices) enclosing LPS points ``pts`` (N, 3) plus a margin, clipped; None if empty."""
        lo = (pts.min(0) - margin_mm - self.origin) / self.sp
        hi = (pts.max(0) + margin_mm - self.origin) / self.sp
        i0, j0, k0 = np.maximum(np.floor(lo).astype(int), 0)
        i1, j1, k1 = np.minimum(np.ceil(hi).astype(int) + 1, [self.shape[2], self.shape[1], self.shape[0]])
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            return None
        return slice(k0, k1), slice(j0, j1), slice(i0, i1)

    def box(self, center, R, lo, hi, margin_mm: float = 2.0):
        """Index box around the local axis-aligned box [lo, hi] (mm) of a frame (center, rotation ``R``)."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        return self.box_points(np.asarray(center) + corners @ np.asarray(R).T, margin_mm)

    def local(self, sl, center, R):
        """Local coordinates (u, v, w) mm, each float32 of the box's shape, of the voxels in box ``sl``."""
        dx = (self.x[sl[2]] - np.float32(center[0]))[None, None, :]
        dy = (self.y[sl[1]] - np.float32(center[1]))[None, :, None]
        dz = (self.z[sl[0]] - np.float32(center[2]))[:, None, None]
        R = np.asarray(R, np.float32)
        return tuple(R[0, c] * dx + R[1, c] * dy + R[2, c] * dz for c in range(3))


def _rot(tilt_deg: float, lateral_deg: float, axial_deg: float) -> np.ndarray:
    """Rotation (columns = local u/v/w axes in LPS) of a vertebra: axial rotation, then lateral and sagittal tilt."""
    a, b, c = np.radians([tilt_deg, lateral_deg, axial_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _ramp(d, w):
    """Partial-volume fraction of a voxel at signed distance ``d`` (mm, < 0 inside) from an edge of ramp width w."""
    return np.clip(np.float32(0.5) - d * np.float32(1.0 / max(w, 1e-3)), 0.0, 1.0)


def _ellipsoid_frac(u, v, w, axes, width):
    """Fraction inside an ellipsoid with semi-axes ``axes`` (mm) centred at the local origin."""
    r = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2)
    rho = np.sqrt(u * u + v * v + w * w)
    d = rho * (1.0 - 1.0 / np.maximum(r, 1e-4))
    return _ramp(d, width)


def _superellipse_d(u, v, a, b, p=2.4, notch=0.0):
    """Signed in-plane distance (mm, along the ray from the centre) to a superellipse with half-axes a, b.

    ``notch`` > 0 indents the posterior (+v) wall near the midline (kidney-shaped vertebral body).
    """
    if notch:
        b = np.where(v > 0, b * (1.0 - notch * np.exp(-(u / (0.35 * a)) ** 2)), b)
    r = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)
    rho = np.sqrt(u * u + v * v)
    return rho * (1.0 - 1.0 / np.maximum(r, 1e-4))


def _paint(vol, sl, frac, value):
    """Composite ``value`` (scalar or box array) with coverage ``frac`` over ``vol[sl]`` in place."""
    view = vol[sl]
    view += frac * (value - view)


# ---------------------------------------------------------------------------------------------------------- params
def _draw_params(rng: np.random.Generator, opts: PhantomOptions) -> Dict:
    """Draw every random parameter of a study, in a fixed order; options override values after drawing."""
    p: Dict = {}

    def pick(name, drawn, override):
        p[name] = drawn if override is None else override
        return p[name]

    # scanner
    th = float(rng.choice(_THICKNESSES, p=_THICKNESS_P))
    th = pick("slice_thickness", th, opts.slice_thickness)
    overlap = rng.random() < 0.3
    sp_frac = float(rng.uniform(0.5, 1.0))
    pick("slice_spacing", round(th * sp_frac, 3) if overlap else th, opts.slice_spacing)
    pick("pixel_spacing", round(float(rng.uniform(0.5, 0.98)), 4), opts.pixel_spacing)
    kvp = pick("kvp", float(rng.choice(_KVPS, p=_KVP_P)), None)
    b_base = {80.0: 1.15, 100.0: 1.05, 120.0: 0.95, 140.0: 0.88}[kvp]
    p["calib_b"] = float(np.clip(b_base * rng.uniform(0.92, 1.08), 0.8, 1.25))
    p["calib_a"] = float(rng.uniform(-10.0, 30.0))
    noise = float(rng.uniform(8.0, 30.0))
    p["noise_sd"] = noise * math.sqrt(2.5 / p["slice_thickness"]) if opts.noise_sd is None else float(opts.noise_sd)
    pick("noise_corr_px", float(rng.uniform(0.5, 1.1)), None)
    pick("psf_sigma_mm", float(rng.uniform(0.35, 0.8)), opts.psf_sigma_mm)
    pick("kernel", str(rng.choice(["B30f", "B45f", "STANDARD", "BONE", "FC18"])), None)
    # patient
    cat = int(rng.integers(0, 3))  # ACR: osteoporosis / osteopenia / normal
    lo, hi = [(30.0, 80.0), (80.0, 120.0), (120.0, 250.0)][cat]
    pick("bmd_mg_cm3", float(rng.uniform(lo, hi)), opts.bmd_mg_cm3)
    p["bmd_level_factor"] = (1.0 + 0.06 * rng.standard_normal(len(LEVELS))).clip(0.8, 1.2).tolist()
    p["size"] = float(rng.uniform(0.88, 1.25))  # base L3 46 x 35.5 mm: small to large adults
    p["height_factor"] = float(rng.uniform(0.92, 1.08))
    p["level_jitter"] = (1.0 + 0.03 * rng.standard_normal((3, len(LEVELS)))).tolist()
    p["disc_factor"] = rng.uniform(0.7, 1.15, len(LEVELS) - 1).tolist()
    p["lordosis"] = float(rng.uniform(0.4, 1.3))
    p["tilt_jitter"] = (2.0 * rng.standard_normal(len(LEVELS))).tolist()
    scol = float(rng.uniform(2.0, 8.0)) if rng.random() < 0.35 else float(rng.uniform(0.0, 2.0))
    p["scoliosis_deg"] = scol if opts.scoliosis else 0.0
    p["scoliosis_period"] = float(rng.uniform(7.0, 12.0))
    p["scoliosis_phase"] = float(rng.uniform(0, 2 * math.pi))
    rot_j = (1.5 * rng.standard_normal(len(LEVELS))).tolist()
    p["rotation_jitter"] = rot_j if opts.scoliosis else [0.0] * len(LEVELS)
    p["cortex_mm"] = float(rng.uniform(0.5, 1.5))
    p["cortex_density"] = float(rng.uniform(600.0, 1000.0))
    p["texture_rel"] = float(rng.uniform(0.12, 0.22))
    p["body_half_width"] = float(rng.uniform(135.0, 190.0))
    p["body_half_depth"] = float(rng.uniform(95.0, 140.0))
    p["subcut_fat_mm"] = float(rng.uniform(8.0, 45.0))
    p["visceral_fat"] = float(rng.uniform(0.15, 0.6))
    p["fat_hu"] = float(rng.uniform(-110.0, -85.0))
    p["muscle_hu"] = float(rng.uniform(10.0, 60.0))  # low end: fat-infiltrated muscle of older patients
    p["disc_hu"] = float(rng.uniform(55.0, 100.0))
    p["csf_hu"] = float(rng.uniform(5.0, 15.0))
    contrast = pick("contrast", bool(rng.random() < 0.4), opts.contrast)
    aorta_c = float(rng.uniform(150.0, 350.0))
    p["aorta_hu"] = aorta_c if contrast else float(rng.uniform(35.0, 50.0))
    p["aorta_radius"] = float(rng.uniform(9.0, 13.0))
    p["liver_hu"] = float(rng.uniform(90.0, 130.0)) if contrast else float(rng.uniform(50.0, 65.0))
    p["kidney_hu"] = float(rng.uniform(140.0, 200.0)) if contrast else float(rng.uniform(25.0, 35.0))
    pick("table", bool(rng.random() < 0.8), opts.table)
    # position (LPS mm): body centre offset from the scanner isocentre, table height, scan z
    p["body_offset"] = [float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20))]
    p["recon_offset"] = [float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))]
    p["z_l3"] = float(rng.uniform(-900.0, -300.0))
    p["scan_bottom_margin"] = float(rng.uniform(5.0, 35.0))
    p["scan_top_cut"] = float(rng.uniform(-0.6, 0.05))
    # events
    frac_draw = bool(rng.random() < (0.14 if p["bmd_mg_cm3"] < 80 else 0.04))
    p["fracture"] = frac_draw if opts.fracture is None else bool(opts.fracture)
    p["fracture_level"] = LEVELS[int(rng.integers(0, 6))]  # T11…L4
    p["fracture_collapse"] = float(rng.uniform(0.2, 0.45))
    metal_draw = bool(rng.random() < 0.06)
    p["metal"] = metal_draw if opts.metal is None else bool(opts.metal)
    p["metal_levels"] = [LEVELS[i] for i in (lambda s: (s, s + 1))(int(rng.integers(4, 6)))]  # L3/L4 or L4/L5
    p["metal_hu"] = float(rng.uniform(3000.0, 6000.0))
    # realism (drawn last so that adding them kept every earlier draw): thick sclerotic endplates, sparse bright
    # trabecular islands, and a share of coarse in-plane reconstructions (3 mm-class pixels, smaller matrix, same FOV)
    p["endplate_mm"] = float(rng.uniform(1.0, 2.0))
    p["islands_per_level"] = float(rng.uniform(0.0, 4.0))
    coarse = bool(rng.random() < 0.15)
    coarse_ps = round(float(rng.uniform(1.5, 3.0)), 4)
    p["matrix"] = int(opts.matrix)
    if coarse and opts.pixel_spacing is None:
        p["matrix"] = max(32, int(round(opts.matrix * p["pixel_spacing"] / coarse_ps)))
        p["pixel_spacing"] = coarse_ps
    # generator v3: endplates are drawn less dense than the lateral cortex (v2's 1–2 mm plates at cortical density
    # made the shell read 145–305 HU at 3 mm against 199 HU in the real CT)
    p["endplate_density_factor"] = float(rng.uniform(0.4, 0.8))
    # ... and the AP depth of the bodies varies on its own (depth/width 0.69–0.87; the real CT's bodies are 0.82)
    p["depth_factor"] = float(rng.uniform(0.95, 1.2))
    # generator v4: posterior elements with a cortical shell and a cancellous core (v1-v3: solid), the ring-shaped
    # laminae / spinous processes a model must learn not to take for vertebral bodies
    p["posterior_cortex_mm"] = float(rng.uniform(0.8, 1.6))
    p["posterior_core_factor"] = float(rng.uniform(0.9, 1.4))
    return p


def _draw_style(rng: np.random.Generator, opts: PhantomOptions) -> DicomStyle:
    """Draw the DICOM encoding (own random stream: changing it never changes the image)."""
    storage = "signed" if rng.random() < 0.6 else "unsigned"
    storage = opts.storage or storage
    signed_choices = [(1.0, -1024.0), (1.0, 0.0), (0.5, -1024.0), (2.0, -2048.0)]
    choice = signed_choices[int(rng.choice(4, p=[0.5, 0.3, 0.1, 0.1]))]
    slope, intercept = (choice if storage == "signed" else (1.0, -1024.0))
    if opts.rescale is not None:
        slope, intercept = float(opts.rescale[0]), float(opts.rescale[1])
    bits = 12 if (storage == "unsigned" and rng.random() < 0.5) else 16
    bits = opts.bits_stored or bits
    ts_names = list(TRANSFER_SYNTAXES)
    ts = ts_names[int(rng.choice(len(ts_names), p=[0.35, 0.15, 0.2, 0.15, 0.15]))]
    ts = opts.transfer_syntax or ts
    shuffle = bool(rng.random() < 0.5) if opts.shuffle_names is None else opts.shuffle_names
    reverse = bool(rng.random() < 0.5) if opts.reverse_instances is None else opts.reverse_instances
    pad = bool(rng.random() < 0.3) and storage == "signed"
    pad = pad if opts.fov_padding is None else opts.fov_padding
    tags = bool(rng.random() < 0.8) if opts.optional_tags is None else opts.optional_tags
    return DicomStyle(storage, slope, intercept, bits, ts, shuffle, reverse, pad, tags)


# ---------------------------------------------------------------------------------------------------------- anatomy
def _spine_frames(p: Dict) -> Dict:
    """Centres (LPS mm, L3 at the origin) and rotations of T11…S1 plus two sacral segments below S1."""
    n = len(LEVELS)
    jit = np.asarray(p["level_jitter"])
    s = p["size"]
    h = _BASE_HEIGHT * s * p["height_factor"] * jit[0]
    d = _BASE_DEPTH * s * p.get("depth_factor", 1.0) * jit[1]
    wdt = _BASE_WIDTH * s * jit[2]
    disc = _BASE_DISC * s * np.asarray(p["disc_factor"])
    tilt = _BASE_TILT * p["lordosis"] + np.asarray(p["tilt_jitter"])
    tilt[-1] = _BASE_TILT[-1] * (0.6 + 0.4 * p["lordosis"]) + p["tilt_jitter"][-1]
    idx = np.arange(n)
    lateral = p["scoliosis_deg"] * np.sin(2 * math.pi * idx / p["scoliosis_period"] + p["scoliosis_phase"])
    lateral[-1] *= 0.3
    axial = 0.6 * lateral + np.asarray(p["rotation_jitter"])
    R = [_rot(tilt[i], lateral[i], axial[i]) for i in range(n)]
    up = [r[:, 2] for r in R]
    c = [np.zeros(3) for _ in range(n)]
    for i in range(3, -1, -1):  # L2 → T11, walking up from L3
        ud = up[i] + up[i + 1]
        ud /= np.linalg.norm(ud)
        c[i] = c[i + 1] + up[i + 1] * h[i + 1] / 2 + ud * disc[i] + up[i] * h[i] / 2
    for i in range(5, n):  # L4 → S1
        ud = up[i] + up[i - 1]
        ud /= np.linalg.norm(ud)
        c[i] = c[i - 1] - up[i - 1] * h[i - 1] / 2 - ud * disc[i - 1] - up[i] * h[i] / 2
    # sacral continuation (unlabelled): S2, S3 smaller, tilted further, fused (1.5 mm ossified disc)
    sac = []
    prev_c, prev_R, prev_h = c[-1], R[-1], h[-1]
    for k, (hs, ds, ws, dt) in enumerate([(22.0, 28.0, 40.0, 14.0), (18.0, 22.0, 32.0, 26.0)]):
        Rk = _rot(tilt[-1] + dt, lateral[-1], axial[-1])
        hs, ds, ws = hs * s, ds * s, ws * s
        ck = prev_c - prev_R[:, 2] * prev_h / 2 - Rk[:, 2] * (1.5 + hs / 2)
        sac.append(dict(center=ck, R=Rk, h=hs, d=ds, w=ws))
        prev_c, prev_R, prev_h = ck, Rk, hs
    return dict(center=c, R=R, h=h, d=d, w=wdt, disc=disc, tilt=tilt, lateral=lateral, axial=axial, sacral=sac)


def _body_fracs(g: _Grid, sl, center, R, h, depth, width, cortex, collapse=0.0, endplate=None):
    """Vertebral-body and trabecular-core partial-volume fractions in box ``sl`` plus local coordinates.

    Returns:
        (f_body, f_core, f_endplates, (u, v, w)), float32 arrays of the box shape: ``f_body - f_core`` is the whole
        shell, ``f_endplates`` its superior/inferior part (inside the lateral cortex); ``collapse`` (mm) lowers the
        anterior part of the superior endplate (wedge compression fracture); ``endplate`` (mm, default ``cortex``) is
        the thickness of the superior and inferior cortical endplates.
    """
    u, v, w = g.local(sl, center, R)
    a, b = width / 2, depth / 2
    waist = 1.0 - 0.06 * np.clip(1.0 - (2.0 * w / h) ** 2, 0.0, 1.0)
    dxy = _superellipse_d(u, v, a * waist, b * waist, 2.4, notch=0.12)
    q = np.clip(1.0 - (u / a) ** 2 - (v / b) ** 2, 0.0, 1.0)
    cup = 1.2 * q  # concave endplates
    top = h / 2 - cup
    if collapse:
        top = top - collapse * np.clip((b - v) / (2 * b), 0.0, 1.0)
    bottom = -h / 2 + cup
    dz = np.maximum(w - top, bottom - w)
    wxy = 0.5 * (g.width(R[:, 0]) + g.width(R[:, 1]))
    wz = g.width(R[:, 2])
    f_body = _ramp(dxy, wxy) * _ramp(dz, wz)
    f_lat = _ramp(dxy + cortex, wxy)
    f_core = f_lat * _ramp(dz + (cortex if endplate is None else endplate), wz)
    f_endplates = f_lat * _ramp(dz, wz) - f_core
    return f_body, f_core, f_endplates, (u, v, w)


def _texture(rng, shape, g: _Grid, sigma_mm=(1.1, 0.6, 0.6)):
    """Zero-mean unit-σ trabecular texture, float32 ``shape``: filtered white noise, anisotropic (vertical struts)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sig = (sigma_mm[0] / g.sp[2], sigma_mm[1] / g.sp[1], sigma_mm[2] / g.sp[0])
    f = ndimage.gaussian_filter(white, sig, mode="reflect", truncate=2.5)
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def _redraw_position(p: Dict, rng: np.random.Generator) -> None:
    """Re-scan: redraw the patient position and scan start (same ranges as :func:`_draw_params`), in place."""
    p["body_offset"] = [float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20))]
    p["recon_offset"] = [float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))]
    p["z_l3"] = float(rng.uniform(-900.0, -300.0))
    p["scan_bottom_margin"] = float(rng.uniform(5.0, 35.0))


# -------------------------------------------------------------------------------------------------------- rendering
class _Renderer:
    """Renders one study; holds the grid, the volume and the bookkeeping of the spine region."""

    def __init__(self, p: Dict, style: DicomStyle, opts: PhantomOptions, rng: np.random.Generator):
        self.p, self.style, self.opts, self.rng = p, style, opts, rng
        self.calib = lambda dens: p["calib_a"] + p["calib_b"] * dens

    # ---------------------------------------------------------------- layout
    def layout(self):
        p, opts = self.p, self.opts
        fr = _spine_frames(p)
        ps, th, dz = p["pixel_spacing"], p["slice_thickness"], p["slice_spacing"]
        n = p.get("matrix", opts.matrix)
        body_c = np.array(p["body_offset"])
        bw, bd = p["body_half_width"], p["body_half_depth"]
        # spine (L3 centre) inside the body: posterior third
        l3 = np.array([body_c[0] + 0.03 * bw, body_c[1] + bd - 72.0 * p["size"], p["z_l3"]])
        fr["center"] = [c + l3 for c in fr["center"]]
        for s in fr["sacral"]:
            s["center"] = s["center"] + l3
        # scan range in z
        lo_pts = [fr["sacral"][0]["center"][2] - fr["sacral"][0]["h"] / 2]
        bottom = min(lo_pts[0], fr["center"][-1][2] - fr["h"][-1] / 2) - p["scan_bottom_margin"]
        top_full = fr["center"][0][2] + fr["h"][0] / 2
        top = top_full + p["scan_top_cut"] * fr["h"][0]
        nk = int(math.floor((top - bottom) / dz)) + 1
        nk = max(8, min(nk, opts.max_slices))
        fov = n * ps
        if fov < 330.0:  # targeted reconstruction: centre on the spine
            ctr = l3[:2] + np.array([0.0, -15.0]) + 0.5 * np.array(p["recon_offset"])
        else:
            ctr = np.array(p["recon_offset"])
        origin = np.array([ctr[0] - (n - 1) / 2 * ps, ctr[1] - (n - 1) / 2 * ps, bottom])
        self.g = _Grid((nk, n, n), origin, np.array([ps, ps, dz]), th)
        self.fr, self.body_c = fr, body_c
        aff = np.eye(4)
        aff[0, 0], aff[1, 1], aff[2, 2] = ps, ps, dz
        aff[:3, 3] = origin
        self.affine = aff
        self.region = None  # index bounds of everything rendered in 3-D (for the PSF)

    def _grow(self, sl):
        if sl is None:
            return
        b = np.array([[s.start, s.stop] for s in sl])
        self.region = b if self.region is None else np.stack([np.minimum(self.region[:, 0], b[:, 0]),
                                                              np.maximum(self.region[:, 1], b[:, 1])], 1)

    def _spine_xy(self, z):
        """Interpolated (x, y) of the vertebral-body axis, AP half-depth and half-width at heights ``z`` (mm)."""
        fr = self.fr
        cz = np.array([c[2] for c in fr["center"]] + [s["center"][2] for s in fr["sacral"]])
        cx = np.array([c[0] for c in fr["center"]] + [s["center"][0] for s in fr["sacral"]])
        cy = np.array([c[1] for c in fr["center"]] + [s["center"][1] for s in fr["sacral"]])
        dd = np.concatenate([fr["d"], [s["d"] for s in fr["sacral"]]]) / 2
        ww = np.concatenate([fr["w"], [s["w"] for s in fr["sacral"]]]) / 2
        o = np.argsort(cz)
        return tuple(np.interp(z, cz[o], arr[o]) for arr in (cx, cy, dd, ww))

    # ---------------------------------------------------------------- background
    def background(self) -> np.ndarray:
        """Soft tissue, organs, vessels, muscles, table, iliac wings.

        Rendered on anchor slices every ~8 mm at ≤ 1.6 mm pixels (soft tissue has no detail finer than that here),
        upsampled bilinearly in-plane and interpolated linearly in z.

        Returns:
            float32 ``(K, J, I)`` HU volume.
        """
        import cv2

        g, p, rng = self.g, self.p, self.rng
        nk, nj, ni = g.shape
        step = 8.0
        z0, z1 = float(g.z[0]), float(g.z[-1])
        na = max(2, int(math.ceil((z1 - z0) / step)) + 1)
        az = np.linspace(z0, z1, na)
        ps = float(g.sp[0])
        f = max(1, int(1.25 / ps + 0.5))
        mj, mi = -(-nj // f), -(-ni // f)
        px = ps * ni / mi  # low-res pixel size (mm)
        X = (g.origin[0] + ((np.arange(mi) + 0.5) * ni / mi - 0.5) * ps).astype(np.float32)[None, :]
        Y = (g.origin[1] + ((np.arange(mj) + 0.5) * nj / mj - 0.5) * g.sp[1]).astype(np.float32)[:, None]
        # smooth random fields for visceral soup / gas (coarse → bilinear upsampling)
        coarse = rng.standard_normal((na, 2, 20, 20)).astype(np.float32)
        coarse = ndimage.gaussian_filter(coarse, (0.8, 0, 1.0, 1.0))
        gas_c = rng.standard_normal((na, 12, 12)).astype(np.float32)

        def ell(img, cx, cy, a, b, value, pw=2.0, within=None):
            """Paint a soft-edged superellipse into ``img`` (low-res anchor), computing only in its bounding box."""
            j0 = max(int((cy - b - 2 * px - Y[0, 0]) / px), 0)
            j1 = min(int((cy + b + 2 * px - Y[0, 0]) / px) + 2, mj)
            i0 = max(int((cx - a - 2 * px - X[0, 0]) / px), 0)
            i1 = min(int((cx + a + 2 * px - X[0, 0]) / px) + 2, mi)
            if j1 <= j0 or i1 <= i0 or a <= 0 or b <= 0:
                return
            sub = (slice(j0, j1), slice(i0, i1))
            fr_ = _ramp(_superellipse_d(X[:, sub[1]] - cx, Y[sub[0]] - cy, a, b, pw), px)
            if within is not None:
                fr_ = fr_ * within[sub]
            img[sub] += fr_ * (value - img[sub])

        sx, sy, sdep, swid = self._spine_xy(az)
        bw, bd = p["body_half_width"], p["body_half_depth"]
        zc = [c[2] for c in self.fr["center"]]
        z_t12, z_l2, z_l4, z_s1 = zc[1], zc[3], zc[5], zc[7]
        bx, by = self.body_c
        anchors = np.empty((na, nj, ni), np.float32)
        img = np.empty((mj, mi), np.float32)
        for a in range(na):
            z = az[a]
            hip = float(np.clip((z_l4 - z) / 80.0, 0.0, 1.0))  # pelvis widens the body caudally
            A = bw * (1.0 + 0.08 * hip)
            B = bd * (1.0 - 0.05 * hip)
            v = Y - by
            dbody = _superellipse_d(X - bx, v, A, np.where(v > 0, B * 0.96, B), 2.3)
            inside = _ramp(dbody, px)
            img[...] = -1000.0 + inside * (p["fat_hu"] + 1000.0)
            t_f = p["subcut_fat_mm"]
            wall = _ramp(dbody + t_f, px)
            cav = _ramp(dbody + t_f + 12.0, px)
            fld = cv2.resize(coarse[a, 0], (mi, mj), interpolation=cv2.INTER_LINEAR)
            tex = cv2.resize(coarse[a, 1], (mi, mj), interpolation=cv2.INTER_LINEAR)
            gas = cv2.resize(gas_c[a], (mi, mj), interpolation=cv2.INTER_LINEAR)
            organ = np.clip((fld - (p["visceral_fat"] * 2 - 1.0) * 0.5) * 3.0 + 0.5, 0, 1)  # 1 = soft organ
            soup = p["fat_hu"] + organ * (40.0 - p["fat_hu"]) + 6.0 * tex
            gas_m = np.clip((gas - 1.6) * 4.0, 0, 1) * (v < (sy[a] - by) - 45.0)
            soup += gas_m * (-950.0 - soup)
            img += (wall - cav) * (p["muscle_hu"] - img)  # abdominal wall muscle ring
            img += cav * (soup - img)
            if z > z_l2:  # liver (patient right = -x)
                lv = float(np.clip((z - z_l2) / 40.0, 0, 1))
                ell(img, bx - 0.45 * A, by - 0.05 * B, 0.5 * A * lv, 0.6 * B * lv, p["liver_hu"], within=cav)
            kz = float(np.clip(1.0 - ((z - 0.5 * (z_t12 + z_l2)) / 55.0) ** 2, 0.0, 1.0))
            for side in (-1, 1):
                if kz > 0:  # kidneys
                    ell(img, sx[a] + side * (swid[a] + 45.0), sy[a] + 5.0, 28 * math.sqrt(kz), 20 * math.sqrt(kz),
                        p["kidney_hu"])
                # erector spinae, psoas (grows caudally)
                ell(img, sx[a] + side * 27.0 * p["size"], sy[a] + sdep[a] + 45.0, 21.0 * p["size"], 24.0 * p["size"],
                    p["muscle_hu"] + 5.0, 2.2, within=inside)
                rp = 6.0 + 16.0 * float(np.clip((z_t12 - z) / max(z_t12 - z_s1, 1.0), 0, 1))
                ell(img, sx[a] + side * (swid[a] + rp * 0.7), sy[a] - 2.0, rp, rp * 0.8, p["muscle_hu"])
            # aorta (bifurcates at L4) and IVC, anterior to the spine
            ya = sy[a] - sdep[a] - p["aorta_radius"] - 3.0
            if z > z_l4:
                ell(img, sx[a] + 14.0, ya, p["aorta_radius"], p["aorta_radius"], p["aorta_hu"])
            else:
                off = 10.0 + 0.5 * (z_l4 - z)
                for side in (-1, 1):
                    ell(img, sx[a] + side * off, ya + 0.2 * (z_l4 - z), 6.5, 6.5, p["aorta_hu"])
            ivc_hu = 0.6 * p["aorta_hu"] + 15.0 if p["contrast"] else 40.0
            ell(img, sx[a] - 20.0, ya - 2.0, 12.0, 8.0, ivc_hu)
            crest = z_l4 - 10.0
            if z < crest:  # iliac wings: curved cortical plates lateral to L5/S1
                depth_in = float(np.clip((crest - z) / 40.0, 0.0, 1.0))
                bone = self.calib(1.1 * p["bmd_mg_cm3"] + 300.0)
                for side in (-1, 1):
                    cx_ = sx[a] + side * (swid[a] + 45.0)
                    rr = np.sqrt((X - cx_) ** 2 + ((Y - (sy[a] + 10.0)) / 1.4) ** 2)
                    band = _ramp(np.abs(rr - (30.0 + 15 * depth_in)) - (2.5 + 4.0 * depth_in), px)
                    band = band * ((side * (X - cx_)) > -15.0)
                    img += band * (bone - img)
            if p["table"]:  # curved carbon-fibre table with a foam core below the back
                yt = by + B * 0.96 + 1.0 + 0.0006 * (X - bx) ** 2
                on = np.abs(X - bx) < 230
                for (t0, t1, hu) in ((0.0, 4.0, 250.0), (4.0, 40.0, -900.0), (40.0, 44.0, 250.0)):
                    band = _ramp(yt + t0 - Y, px) * _ramp(Y - (yt + t1), px) * on
                    img += band * (hu - img)
            cv2.resize(img, (ni, nj), dst=anchors[a], interpolation=cv2.INTER_LINEAR)
        # interpolate anchors → slices
        vol = np.empty((nk, nj, ni), np.float32)
        seg = np.clip(np.searchsorted(az, g.z, side="right") - 1, 0, na - 2)
        for k in range(nk):
            a0 = int(seg[k])
            t = float(min(max((g.z[k] - az[a0]) / (az[a0 + 1] - az[a0]), 0.0), 1.0))
            cv2.addWeighted(anchors[a0], 1.0 - t, anchors[a0 + 1], t, 0.0, dst=vol[k])
        return vol

    # ---------------------------------------------------------------- spine
    def spine(self, vol, labels, cores):
        g, p, fr, rng = self.g, self.p, self.fr, self.rng
        n = len(LEVELS)
        cortex = p["cortex_mm"]
        metal_segments = self._metal_segments() if p["metal"] else []
        self.metal_segments = metal_segments
        # discs (painted first: bodies overlap them)
        for i in range(n - 1):
            c0, c1 = fr["center"][i], fr["center"][i + 1]
            R0, R1 = fr["R"][i], fr["R"][i + 1]
            ud = R0[:, 2] + R1[:, 2]
            ud /= np.linalg.norm(ud)
            Rd = R1.copy()
            Rd[:, 2] = ud
            Rd[:, 1] = np.cross(ud, Rd[:, 0])
            Rd[:, 1] /= np.linalg.norm(Rd[:, 1])
            Rd[:, 0] = np.cross(Rd[:, 1], ud)
            extra = 0.0
            if p["fracture"] and LEVELS[i + 1] == p["fracture_level"]:
                extra = p["fracture_collapse"] * fr["h"][i + 1]
            top = c0 - R0[:, 2] * fr["h"][i] / 2
            bot = c1 + R1[:, 2] * (fr["h"][i + 1] / 2 - extra)
            cd = 0.5 * (top + bot)
            hd = float(np.dot(top - bot, ud)) + 3.0
            a = 0.5 * min(fr["w"][i], fr["w"][i + 1]) + 1.0
            b = 0.5 * min(fr["d"][i], fr["d"][i + 1]) + 1.0
            sl = g.box(cd, Rd, [-a, -b, -hd / 2], [a, b, hd / 2])
            if sl is None:
                continue
            u, v, w = g.local(sl, cd, Rd)
            dxy = _superellipse_d(u, v, a, b, 2.4, notch=0.12)
            f = _ramp(dxy, 0.5 * (g.width(Rd[:, 0]) + g.width(Rd[:, 1]))) * _ramp(np.abs(w) - hd / 2, g.width(ud))
            nucleus = np.clip(1.0 + dxy / (0.45 * min(a, b)), 0.0, 1.0)
            _paint(vol, sl, f, p["disc_hu"] + 25.0 - 40.0 * nucleus)
            self._grow(sl)
        # spinal canal (continuous tube, CSF) and epidural fat rim
        for i in range(n):
            c, R, h, d = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i]
            span = h / 2 + (fr["disc"][min(i, n - 2)] if i < n - 1 else 4.0) / 2 + 3.0
            cc = c + R[:, 1] * (d / 2 + 9.0 * p["size"])
            ac, bc = 11.0 * p["size"] * (1 + 0.04 * i), 8.5 * p["size"]
            sl = g.box(cc, R, [-ac - 3, -bc - 3, -span], [ac + 3, bc + 3, span])
            if sl is None:
                continue
            u, v, w = g.local(sl, cc, R)
            dxy = _superellipse_d(u, v, ac, bc, 2.2)
            wz = _ramp(np.abs(w) - span + 2.0, 3.0)
            _paint(vol, sl, _ramp(dxy, g.width(R[:, 0])) * wz, p["fat_hu"] + 20.0)
            _paint(vol, sl, _ramp(dxy + 2.0, g.width(R[:, 0])) * wz, p["csf_hu"])
        # posterior elements and ribs before the bodies, so that nothing but metal covers a trabecular core
        for i in range(n):
            self._posterior(vol, i)
        self._ribs(vol)
        # sacral continuation bodies (unlabelled)
        for s in fr["sacral"]:
            sl = g.box(s["center"], s["R"], [-s["w"] / 2, -s["d"] / 2, -s["h"] / 2], [s["w"] / 2, s["d"] / 2, s["h"] / 2])
            if sl is None:
                continue
            fb, fc, _, _ = _body_fracs(g, sl, s["center"], s["R"], s["h"], s["d"], s["w"], cortex)
            dens = 1.1 * p["bmd_mg_cm3"] + 10.0 * _texture(rng, fb.shape, g)
            _paint(vol, sl, fb - fc, self.calib(p["cortex_density"]))
            _paint(vol, sl, fc, self.calib(dens))
            self._grow(sl)
        # vertebral bodies with textured trabecular cores
        self.level_boxes = {}
        self.level_info = {}
        z_lo, z_hi = g.z[0] - g.sp[2] / 2, g.z[-1] + g.sp[2] / 2
        for i, name in enumerate(LEVELS):
            c, R, h, d, w = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i], fr["w"][i]
            bmd = p["bmd_mg_cm3"] * p["bmd_level_factor"][i]
            fractured = bool(p["fracture"] and name == p["fracture_level"])
            if fractured:
                bmd *= 1.05 + 0.15 * p["fracture_collapse"] / 0.45
            bmd = float(np.clip(bmd, 20.0, 300.0))
            collapse = p["fracture_collapse"] * h if fractured else 0.0
            lo, hi = [-w / 2 - 1, -d / 2 - 1, -h / 2 - 1], [w / 2 + 1, d / 2 + 1, h / 2 + 1]
            corners = np.array([[a, b, cz] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for cz in (lo[2], hi[2])])
            zc = (c + corners @ R.T)[:, 2]
            in_view = float(np.clip((min(zc.max(), z_hi) - max(zc.min(), z_lo)) / (zc.max() - zc.min()), 0.0, 1.0))
            sl = g.box(c, R, lo, hi)
            self.level_info[name] = dict(bmd=bmd, fractured=fractured, in_view=in_view, center=c.tolist(),
                                         height_mm=float(h), depth_mm=float(d), width_mm=float(w))
            if sl is None:
                continue
            fb, fc, fe, (u, v, ww) = _body_fracs(g, sl, c, R, h, d, w, cortex + 0.2 * (i == 7), collapse,
                                                 endplate=p.get("endplate_mm"))
            tau = p["texture_rel"] + 0.12 * (1.0 - bmd / 250.0)
            tex = _texture(rng, fb.shape, g)
            dens = bmd * (1.0 + tau * tex)
            vein = np.exp(-((u / 4.0) ** 2 + ((v - 0.3 * d) / 5.0) ** 2 + (ww / 3.0) ** 2))
            dens *= 1.0 - 0.45 * vein
            # sclerotic islands: the heavy bright tail of real trabecular HU (the core mean is restored below)
            for _ in range(int(rng.poisson(p.get("islands_per_level", 0.0)))):
                cu, cv, cw = rng.uniform(-0.35, 0.35, 3) * np.array([w, d, h])
                rad, amp = rng.uniform(1.0, 2.5), rng.uniform(150.0, 400.0)
                dens += np.float32(amp) * np.exp(-((u - cu) ** 2 + (v - cv) ** 2 + (ww - cw) ** 2) / (2 * rad * rad))
            core_m = fc >= 0.99
            if metal_segments:
                near = np.zeros(fc.shape, bool)
                for (pa, pb, r, _) in metal_segments:
                    near |= self._capsule_d(sl, pa, pb, r) < 2.0
                core_m &= ~near
            if core_m.any():
                dens += np.float32(bmd - dens[core_m].mean(dtype=np.float64))
            _paint(vol, sl, fb - fc, self.calib(p["cortex_density"]))
            if p.get("endplate_density_factor", 1.0) != 1.0:  # subchondral plates: thicker but less dense than cortex
                _paint(vol, sl, fe, self.calib(p["endplate_density_factor"] * p["cortex_density"]))
            _paint(vol, sl, fc, self.calib(dens))
            lv = LEVEL_TO_LABEL[name]
            if in_view >= 0.5:
                labels[sl][fb >= 0.5] = lv
                cores[sl][core_m] = lv
            self.level_boxes[name] = sl
            self._grow(sl)
        # ribs at T11/T12, metal last
        for (pa, pb, r, hu) in metal_segments:
            sl = g.box_points(np.array([pa, pb]), r + 2.0)
            if sl is None:
                continue
            d = self._capsule_d(sl, pa, pb, r)
            _paint(vol, sl, _ramp(d, g.width(np.ones(3) / math.sqrt(3))), hu)
            self._grow(sl)

    def _capsule_d(self, sl, pa, pb, r):
        """Signed distance (mm) from the voxels of box ``sl`` to a capsule of radius r around segment pa→pb."""
        g = self.g
        dx = (g.x[sl[2]] - np.float32(pa[0]))[None, None, :]
        dy = (g.y[sl[1]] - np.float32(pa[1]))[None, :, None]
        dz = (g.z[sl[0]] - np.float32(pa[2]))[:, None, None]
        ab = np.asarray(pb, np.float32) - np.asarray(pa, np.float32)
        L2 = float(ab @ ab)
        t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / L2, 0.0, 1.0)
        return np.sqrt((dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2) - r

    def _posterior(self, vol, i):
        """Pedicles, laminae, spinous and transverse processes, facets of level ``i`` (ellipsoids, local frame)."""
        g, p, fr = self.g, self.p, self.fr
        c, R, h, d = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i]
        s = p["size"]
        ac = 11.0 * s * (1 + 0.04 * i)
        yc = d / 2 + 9.0 * s  # canal centre (posterior of body centre)
        hu = self.calib(1.3 * fr_bmd(p, i) + 150.0)
        name = LEVELS[i]
        tp_len = {"T11": 8.0, "T12": 9.0, "L1": 13.0, "L2": 16.0, "L3": 18.0, "L4": 16.0, "L5": 15.0, "S1": 26.0}[name]
        tp_thick = 9.0 if name == "S1" else 5.0
        parts = [
            ((+(ac + 2.5), d / 2 + 4.0, 0.12 * h), (4.0 * s, 7.0, 0.3 * h)),  # pedicles
            ((-(ac + 2.5), d / 2 + 4.0, 0.12 * h), (4.0 * s, 7.0, 0.3 * h)),
            ((+(0.55 * ac), yc + 9.0, -0.05 * h), (0.6 * ac + 3, 3.5, 0.38 * h)),  # laminae
            ((-(0.55 * ac), yc + 9.0, -0.05 * h), (0.6 * ac + 3, 3.5, 0.38 * h)),
            ((0.0, yc + 9.0 + 16.0 * s, -0.2 * h), (3.5, 17.0 * s, 0.33 * h)),  # spinous process
            ((+(ac + 3.0 + tp_len), d / 2 + 8.0, 0.1 * h), (tp_len, tp_thick, tp_thick)),  # transverse
            ((-(ac + 3.0 + tp_len), d / 2 + 8.0, 0.1 * h), (tp_len, tp_thick, tp_thick)),
            ((+(ac + 4.0), yc + 3.0, 0.45 * h), (5.0, 6.0, 6.0)),  # facets
            ((-(ac + 4.0), yc + 3.0, 0.45 * h), (5.0, 6.0, 6.0)),
            ((+(ac + 4.0), yc + 3.0, -0.45 * h), (5.0, 6.0, 6.0)),
            ((-(ac + 4.0), yc + 3.0, -0.45 * h), (5.0, 6.0, 6.0)),
        ]
        if name == "S1":  # sacral alae
            parts += [((side * (d * 0.9), d * 0.15, 0.0), (d * 0.55, 0.5 * d, 0.45 * h)) for side in (-1, 1)]
        width = (g.width(R[:, 0]) + g.width(R[:, 1]) + g.width(R[:, 2])) / 3
        shell = p.get("posterior_cortex_mm")
        # v1-v3: solid bone; v4: a cortical shell first, then the cancellous core painted over every shell (no inner
        # walls where parts overlap) -- real laminae and spinous processes are rings like small bodies
        outer = hu if shell is None else self.calib(p["cortex_density"])
        boxes = []
        for (off, ax) in parts:
            pc = c + R @ np.asarray(off)
            sl = g.box(pc, R, [-ax[0], -ax[1], -ax[2]], list(ax))
            if sl is None:
                continue
            u, v, w = g.local(sl, pc, R)
            boxes.append((sl, u, v, w, ax))
            _paint(vol, sl, _ellipsoid_frac(u, v, w, ax, width), outer)
            self._grow(sl)
        if shell is not None:
            core = self.calib(p["posterior_core_factor"] * fr_bmd(p, i) + 30.0)
            for sl, u, v, w, ax in boxes:
                inner = [max(a - shell, 0.5) for a in ax]
                _paint(vol, sl, _ellipsoid_frac(u, v, w, inner, width), core)

    def _ribs(self, vol):
        """11th/12th ribs: short curved tubes from the transverse processes, running lateral, anterior and down."""
        g, p, fr = self.g, self.p, self.fr
        hu_c = self.calib(1.2 * p["bmd_mg_cm3"] + 250.0)
        for i, length in ((0, 140.0), (1, 110.0)):
            c, R, d = fr["center"][i], fr["R"][i], fr["d"][i]
            for side in (-1, 1):
                pts = []
                for t in np.linspace(0.0, 1.0, 6):
                    ang = t * length / 95.0  # radians along a ~95 mm radius arc
                    x = side * (25.0 + 95.0 * math.sin(ang) * 0.9)
                    y = d / 2 + 15.0 - 95.0 * (1 - math.cos(ang)) * 0.6
                    z = -t * 0.45 * length
                    pts.append(c + R @ np.array([x, y, z]))
                for pa, pb in zip(pts[:-1], pts[1:]):
                    sl = g.box_points(np.array([pa, pb]), 8.0)
                    if sl is None:
                        continue
                    dd = self._capsule_d(sl, pa, pb, 5.0)
                    _paint(vol, sl, _ramp(dd, 1.0), hu_c - 120.0)
                    _paint(vol, sl, _ramp(dd + 1.2, 1.0), self.calib(0.9 * p["bmd_mg_cm3"] + 40.0))
                    self._grow(sl)

    def _metal_segments(self):
        """Pedicle screws (two per level) and rods as capsules: list of (start, end, radius mm, HU)."""
        p, fr = self.p, self.fr
        segs, heads = [], {-1: [], 1: []}
        for name in p["metal_levels"]:
            i = LEVELS.index(name)
            c, R, d = fr["center"][i], fr["R"][i], fr["d"][i]
            ac = 11.0 * p["size"] * (1 + 0.04 * i)
            for side in (-1, 1):
                entry = c + R @ np.array([side * (ac + 4.0), d / 2 + 22.0, 0.12 * fr["h"][i]])
                tip = c + R @ np.array([side * (ac - 12.0), -0.25 * d, 0.12 * fr["h"][i]])
                segs.append((entry, tip, 3.0, p["metal_hu"]))
                head = c + R @ np.array([side * (ac + 6.0), d / 2 + 28.0, 0.12 * fr["h"][i]])
                segs.append((head, head + R[:, 1] * 2.0, 5.5, p["metal_hu"]))
                heads[side].append(head)
        for side in (-1, 1):
            if len(heads[side]) == 2:
                segs.append((heads[side][0], heads[side][1], 2.75, p["metal_hu"]))
        return segs

    # ---------------------------------------------------------------- physics
    def psf(self, vol):
        """In-plane Gaussian PSF over the spine region (the background is already band-limited by its ramps)."""
        s = self.p["psf_sigma_mm"]
        if not s or self.region is None:
            return
        m = int(math.ceil(4 * s / self.g.sp[0])) + 2
        b = self.region
        sl = (slice(b[0, 0], b[0, 1]), slice(max(b[1, 0] - m, 0), b[1, 1] + m), slice(max(b[2, 0] - m, 0), b[2, 1] + m))
        sub = vol[sl]
        ndimage.gaussian_filter1d(sub, s / self.g.sp[0], axis=2, output=sub, truncate=3.0)
        ndimage.gaussian_filter1d(sub, s / self.g.sp[1], axis=1, output=sub, truncate=3.0)

    def noise(self, vol, rng):
        """Add correlated Gaussian noise: a bank of filtered noise slices, randomly cropped/flipped per slice."""
        sd = self.p["noise_sd"]
        if not sd:
            return
        nk, nj, ni = vol.shape
        pad = 32
        nb = min(16, nk)
        bank = rng.standard_normal((nb, nj + pad, ni + pad), dtype=np.float32)
        ndimage.gaussian_filter(bank, (0, self.p["noise_corr_px"], self.p["noise_corr_px"]), output=bank)
        bank *= np.float32(sd / bank.std())
        picks = rng.integers(0, nb, nk)
        offs = rng.integers(0, pad + 1, (nk, 2))
        flips = rng.integers(0, 2, (nk, 2)).astype(bool)
        for k in range(nk):
            nz = bank[picks[k], offs[k, 0]:offs[k, 0] + nj, offs[k, 1]:offs[k, 1] + ni]
            if flips[k, 0]:
                nz = nz[::-1]
            if flips[k, 1]:
                nz = nz[:, ::-1]
            vol[k] += nz


def fr_bmd(p: Dict, i: int) -> float:
    """Level ``i``'s drawn BMD before fracture compaction (mg/cm³); used for posterior-element density."""
    return p["bmd_mg_cm3"] * p["bmd_level_factor"][i]


# ------------------------------------------------------------------------------------------------------- public API
def generate_study(seed: int, options: Optional[PhantomOptions] = None, study_id: Optional[str] = None) -> PhantomStudy:
    """Render one phantom study in memory (nothing is written).

    Args:
        seed: integer seed; the same seed and options give bit-identical arrays. Use :func:`study_seed` to derive
            per-study seeds of a dataset from one base seed.
        options: what to generate (default: clinical 512² studies with every variation drawn at random).
        study_id: identifier (default ``phantom_<seed>``).

    Returns:
        :class:`PhantomStudy` with ``hu`` (K, J, I) float32 HU, ``affine`` (4, 4) LPS, ``labels``/``cores`` uint8
        (K, J, I), ``truth`` per labelled level and ``params``.
    """
    opts = options or PhantomOptions()
    opts.validate()
    ss = np.random.SeedSequence(int(seed))
    s_par, s_img, s_noise, s_dcm = ss.spawn(4)
    p = _draw_params(np.random.default_rng(s_par), opts)
    if opts.rescan_seed is not None:  # same patient and scanner; new position, scan start and noise
        s_pos, s_noise = np.random.SeedSequence([int(seed), int(opts.rescan_seed), 0x5E5CA9]).spawn(2)
        _redraw_position(p, np.random.default_rng(s_pos))
    style = _draw_style(np.random.default_rng(s_dcm), opts)
    r = _Renderer(p, style, opts, np.random.default_rng(s_img))
    r.layout()
    vol = r.background()
    labels = np.zeros(vol.shape, np.uint8)
    cores = np.zeros(vol.shape, np.uint8)
    r.spine(vol, labels, cores)
    r.psf(vol)
    truth = []
    for i, name in enumerate(LEVELS):
        info = r.level_info.get(name)
        sl = r.level_boxes.get(name)
        if info is None or sl is None or info["in_view"] < 0.5:
            continue
        lv = LEVEL_TO_LABEL[name]
        m = cores[sl] == lv
        if not m.any():
            continue
        truth.append(dict(
            level=name, label=lv, bmd_mg_cm3=round(info["bmd"], 3),
            trabecular_hu=round(float(vol[sl][m].mean(dtype=np.float64)), 3),
            calibrated_hu=round(p["calib_a"] + p["calib_b"] * info["bmd"], 3),
            core_voxels=int(m.sum()), body_voxels=int((labels[sl] == lv).sum()),
            in_view=round(info["in_view"], 3), fractured=info["fractured"],
            metal=bool(p["metal"] and name in p["metal_levels"]),
            height_mm=round(info["height_mm"], 2), depth_mm=round(info["depth_mm"], 2),
            width_mm=round(info["width_mm"], 2),
        ))
    r.noise(vol, np.random.default_rng(s_noise))
    if style.fov_padding:
        n = vol.shape[1]
        yy, xx = np.mgrid[:n, :n]
        outside = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (n / 2) ** 2
        vol[:, outside] = -3024.0
    lo, hi = style.hu_range
    np.clip(vol, lo, hi, out=vol)
    params = dict(p)
    params.update(
        seed=int(seed), matrix=int(vol.shape[1]), n_slices=int(vol.shape[0]),
        **({"rescan_seed": int(opts.rescan_seed)} if opts.rescan_seed is not None else {}),
        dicom=dataclasses.asdict(style),
        levels={k: {kk: vv for kk, vv in v.items()} for k, v in r.level_info.items()},
        spine_centers_lps={LEVELS[i]: [round(float(x), 3) for x in r.fr["center"][i]] for i in range(len(LEVELS))},
    )
    return PhantomStudy(
        study_id=study_id or f"phantom_{seed}", seed=int(seed), hu=vol, affine=r.affine, labels=labels, cores=cores,
        truth=truth, params=_jsonable(params), style=style, slice_thickness=float(p["slice_thickness"]),
    )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


# ----------------------------------------------------------------------------------------------------------- DICOM
def _store(hu: np.ndarray, style: DicomStyle) -> np.ndarray:
    """HU → stored integers (int16 or uint16) with the style's slope/intercept, rounded and clipped."""
    lo, hi = style.hu_range
    raw = np.rint((np.clip(hu, lo, hi) - style.intercept) / style.slope)
    return raw.astype(np.int16 if style.storage == "signed" else np.uint16)


def _uid(study: PhantomStudy, *what) -> str:
    """Deterministic DICOM UID from the study seed and a purpose string."""
    from pydicom.uid import generate_uid

    rescan = study.params.get("rescan_seed")  # a re-scan is a new series (and study) of the same patient
    extra = [f"rescan-{rescan}"] if rescan is not None else []
    return generate_uid(entropy_srcs=["bmd_d2-phantom", str(study.seed), study.study_id, *extra, *map(str, what)])


def write_dicom_series(study: PhantomStudy, out_dir, style: Optional[DicomStyle] = None) -> List[Path]:
    """Write ``study`` as a CT Image Storage series, one file per slice.

    Args:
        study: from :func:`generate_study`.
        out_dir: folder to create (existing ``*.dcm`` files in it are removed first).
        style: encoding; defaults to ``study.style``.

    Returns:
        Paths of the written files in slice (inferior → superior) order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom import uid as puid

    style = style or study.style
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.dcm"):
        old.unlink()
    nk, nj, ni = study.hu.shape
    p = study.params
    ts_uid = getattr(puid, TRANSFER_SYNTAXES[style.transfer_syntax])
    study_uid, series_uid, frame_uid = _uid(study, "study"), _uid(study, "series"), _uid(study, "frame")
    rng = np.random.default_rng(np.random.SeedSequence([study.seed & 0xFFFFFFFF, 77]))
    date = (np.datetime64("2001-01-01") + int(rng.integers(0, 7000))).astype(str).replace("-", "")
    time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    lo_hu, hi_hu = style.hu_range

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = puid.CTImageStorage
    fm.TransferSyntaxUID = ts_uid
    fm.ImplementationClassUID = puid.PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "BMD_D2_PHANTOM"
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = puid.CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "BMD_D2 SYNTHETIC"
    ds.InstitutionName = "Synthetic Phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "SYNTHETIC LUMBAR SPINE PHANTOM"
    ds.SeriesDescription = f"Phantom {p['kernel']} {study.slice_thickness:g}mm"
    ds.ManufacturerModelName = "bmd_d2 phantom generator"
    ds.PatientName = "PHANTOM^BMD"
    ds.PatientID = f"PHANTOM-{study.study_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "LSPINE"
    ds.SliceThickness = f"{study.slice_thickness:g}"
    ds.KVP = f"{p['kvp']:g}"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{ni * study.spacing[2]:.2f}"
    ds.ConvolutionKernel = p["kernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = nj, ni
    ds.PixelSpacing = [f"{study.spacing[1]:g}", f"{study.spacing[2]:g}"]  # row spacing (dy), column spacing (dx)
    ds.BitsAllocated = 16
    ds.BitsStored = style.bits_stored
    ds.HighBit = style.bits_stored - 1
    ds.PixelRepresentation = 1 if style.storage == "signed" else 0
    if style.optional_tags:
        ds.SpacingBetweenSlices = f"{study.spacing[0]:g}"
        ds.WindowCenter = "350"
        ds.WindowWidth = "1000"
    if style.fov_padding:
        ds.PixelPaddingValue = int(round((-3024.0 - style.intercept) / style.slope))
    ds.RescaleIntercept = f"{style.intercept:g}"
    ds.RescaleSlope = f"{style.slope:g}"
    ds.RescaleType = "HU"

    order = np.arange(nk)[::-1] if style.reverse_instances else np.arange(nk)
    inst = np.empty(nk, int)
    inst[order] = np.arange(1, nk + 1)
    paths: List[Path] = []
    compressed = style.transfer_syntax not in ("explicit", "implicit")
    plugin = ""
    if compressed:  # prefer the fast native encoder (pylibjpeg-rle is ~15x faster than pydicom's own RLE)
        from pydicom.pixels import get_encoder

        plugins = get_encoder(ts_uid).available_plugins
        plugin = "pylibjpeg" if "pylibjpeg" in plugins else ""
    for k in range(nk):
        sop = _uid(study, "sop", k)
        fm.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(inst[k])
        ipp = study.affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp[:3]]
        if style.optional_tags:
            ds.SliceLocation = f"{ipp[2]:.4f}"
        arr = _store(study.hu[k], style)
        if compressed:
            if "PixelData" in ds:
                del ds.PixelData
            fm.TransferSyntaxUID = puid.ExplicitVRLittleEndian
            ds.compress(ts_uid, arr, encoding_plugin=plugin, generate_instance_uid=False)
        else:
            ds.PixelData = arr.tobytes()
        if style.shuffle_names:
            name = hashlib.sha1(sop.encode()).hexdigest()[:16] + ".dcm"
        else:
            name = f"IM{int(inst[k]):05d}.dcm"
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------- files
def _ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """NIfTI (RAS) affine of an LPS voxel→patient affine: negate the x and y rows."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def _save_nifti(arr_kji: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr_kji).transpose(2, 1, 0), _ras_affine(affine_lps))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_preview(study: PhantomStudy, path) -> None:
    """Mid-sagittal slice (square mm pixels, superior up, anterior left) with label overlay, plus the L3 axial."""
    from PIL import Image, ImageDraw

    dk, dj, di = study.spacing
    c = study.params["spine_centers_lps"]["L3"]
    inv = np.linalg.inv(study.affine)
    i_mid = int(round((inv @ np.array([c[0], c[1], c[2], 1.0]))[0]))
    i_mid = int(np.clip(i_mid, 0, study.hu.shape[2] - 1))
    k_l3 = int(np.clip(round((inv @ np.array([c[0], c[1], c[2], 1.0]))[2]), 0, study.hu.shape[0] - 1))

    def window(a):
        return (np.clip((a - (350 - 500)) / 1000.0, 0, 1) * 255).astype(np.uint8)

    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.float32)

    def overlay(gray, lab):
        rgb = np.repeat(gray[..., None].astype(np.float32), 3, -1)
        m = lab > 0
        rgb[m] = 0.6 * rgb[m] + 0.4 * palette[lab[m]]
        return rgb.astype(np.uint8)

    sag = study.hu[::-1, :, i_mid]  # (K, J) superior at top, anterior (small y) left
    lab = study.labels[::-1, :, i_mid]
    scale = min(dk, dj)
    size = (max(1, int(round(sag.shape[1] * dj / scale))), max(1, int(round(sag.shape[0] * dk / scale))))
    fit = min(1.0, 700.0 / max(size))
    size = (max(1, int(size[0] * fit)), max(1, int(size[1] * fit)))
    im_s = Image.fromarray(overlay(window(sag), lab)).resize(size, Image.NEAREST)
    ax = overlay(window(study.hu[k_l3]), study.labels[k_l3])
    ah = size[1]
    aw = max(1, int(ax.shape[1] * ah / ax.shape[0]))
    im_a = Image.fromarray(ax).resize((aw, ah), Image.BILINEAR)
    canvas = Image.new("RGB", (size[0] + aw + 4, ah), (0, 0, 0))
    canvas.paste(im_s, (0, 0))
    canvas.paste(im_a, (size[0] + 4, 0))
    draw = ImageDraw.Draw(canvas)
    for t in study.truth:
        rows, cols = np.nonzero(lab == t["label"])
        if rows.size:
            y = rows.mean() * size[1] / sag.shape[0]
            x = cols.max() * size[0] / sag.shape[1]
            draw.text((min(x + 4, size[0] - 90), y - 5), f"{t['level']} {t['bmd_mg_cm3']:.0f}", fill=(255, 255, 255))
    draw.text((4, 4), f"{study.study_id} {study.slice_thickness:g}mm", fill=(255, 255, 0))
    canvas.save(str(path), optimize=False)


def write_study(study: PhantomStudy, study_dir, preview: bool = True) -> Path:
    """Write ``dicom/``, ``labels.nii.gz``, ``cores.nii.gz``, ``phantom.json`` and ``preview.png`` into study_dir."""
    d = Path(study_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_dicom_series(study, d / "dicom")
    _save_nifti(study.labels, study.affine, d / "labels.nii.gz")
    _save_nifti(study.cores, study.affine, d / "cores.nii.gz")
    rec = dict(study_id=study.study_id, truth=study.truth, params=study.params, generator_version=GENERATOR_VERSION,
               affine_lps=study.affine.tolist(), shape_kji=list(study.hu.shape))
    (d / "phantom.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    if preview:
        write_preview(study, d / "preview.png")
    return d


def write_bmd_csv(path, rows: Sequence[Dict], replace_studies: Optional[Sequence[str]] = None) -> None:
    """Write ``bmd.csv`` (``study_id,level,bmd_mg_cm3,trabecular_hu``), keeping rows of other studies already there.

    Args:
        path: CSV path.
        rows: dicts with the four :data:`CSV_FIELDS`.
        replace_studies: study ids whose old rows are dropped (default: the ids in ``rows``).
    """
    path = Path(path)
    drop = set(replace_studies if replace_studies is not None else (r["study_id"] for r in rows))
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r.get("study_id") not in drop]
    allrows = old + [{k: r[k] for k in CSV_FIELDS} for r in rows]
    order = {name: i for i, name in enumerate(LEVELS)}
    allrows.sort(key=lambda r: (r["study_id"], order.get(r["level"], 99)))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), lineterminator="\n")
        wr.writeheader()
        for r in allrows:
            wr.writerow({k: (f"{float(r[k]):.3f}" if k in ("bmd_mg_cm3", "trabecular_hu") else r[k]) for k in CSV_FIELDS})
    os.replace(tmp, path)


def generate_dataset(root, n: int, seed: int = 0, options: Optional[PhantomOptions] = None, start: int = 0,
                     progress: bool = True, prefix: str = "phantom") -> List[str]:
    """Write studies ``start … start+n-1`` under ``root/studies/`` and (re)write ``root/bmd.csv``.

    ``bmd.csv`` is updated (atomically) after every study, so an interrupted run keeps the truth of every finished
    study and can be continued with ``start``. Study ``i`` uses seed :func:`study_seed(seed, i)` and id :func:`study_id_for(i)`, so a dataset can be generated
    in chunks (or regenerated partly) with identical results.

    Returns:
        The study ids written.
    """
    opts = options or PhantomOptions()
    root = Path(root)
    (root / "studies").mkdir(parents=True, exist_ok=True)
    ids = []
    it = range(start, start + n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="phantoms", unit="study")
    for i in it:
        sid = study_id_for(i, prefix)
        st = generate_study(study_seed(seed, i), opts, sid)
        write_study(st, root / "studies" / sid, preview=opts.preview)
        rows = [dict(study_id=sid, **{k: t[k] for k in CSV_FIELDS[1:]}) for t in st.truth]
        write_bmd_csv(root / "bmd.csv", rows, replace_studies=[sid])
        ids.append(sid)
        logger.debug("wrote %s (%d slices, %d levels)", sid, st.hu.shape[0], len(st.truth))
    return ids
