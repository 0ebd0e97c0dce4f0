"""Quality-control checks that flag (or withhold) measurements a reader should not trust blindly.

Every flag raised here is registered in :data:`bmd_d2.measure.result.QC_FLAGS` and documented in
docs/measurement.md ("QC flags"). The checks are deliberately simple and explainable:

* **Acquisition** (:func:`volume_flags`): the loader's one-line warnings are mapped to study flags — ``slice_gaps``
  (missing slices or uneven spacing, resampled), ``gantry_tilt``, ``non_axial`` (non-axial or oblique slices) and
  ``duplicate_slices``.
* **Bone present** (:func:`mask_has_bone`): a vertebral body always holds cortex/endplates, so the 95th percentile
  HU of its sagittal mask reaches ``MEASURE.MIN_BONE_HU``; a water cylinder, soft tissue or a uniform blob does not
  (rejected as ``not_bone``).
* **Metal** (:func:`metal_in_mask`): any HU ≥ ``MEASURE.METAL_HU`` in the mask on the sagittal slices or in its
  extrusion ±``CORE_HALF_WIDTH_MM`` through the volume (pedicle screws, cement with metal, prostheses) → ``metal``,
  BMD withheld.
* **Height loss** (:func:`height_loss`): Genant-style semi-quantitative grade from the anterior/middle/posterior
  heights: the reduction is the larger of ``1 - min/max`` of the three heights (wedge, biconcave) and
  ``1 - max / reference`` where the reference is the median maximal height of up to two vertebral bodies on each
  side (crush). Grade 1/2/3 at ``MEASURE.HEIGHT_LOSS_GRADES`` (20/25/40 %); grade ≥ 1 → ``vertebral_height_loss``.
* **Contrast phase** (:func:`contrast_check`): at each measured vertebral body, an axial patch of the volume in
  front of it (80 × 43 mm, from 35 mm right to 45 mm left of the anterior cortex and 2–45 mm anterior of it: where
  the aorta and IVC run) is thresholded at 100–700 HU, opened with a 3 mm disk (removes calcified specks, thin
  cortex, noise); of the vessel-sized blobs (≥ 50 mm²) the brightest (median HU) is kept and its 90th-percentile HU
  (the lumen, not the partial-volume rim) is the level's vessel HU. When a blob is found at half of the levels or
  more and the median of their vessel HU is ≥ ``MEASURE.CONTRAST_HU`` (120) the study is ``contrast_enhanced``.
  Unenhanced blood (35–60 HU) never reaches the threshold. Oral contrast in bowel directly in front of the spine
  can mimic it (documented limitation).
"""
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from bmd_d2.data.sagittal import map_coordinates_f32

logger = logging.getLogger(__name__)

# Loader warning (substring, lower case) → study flag.
_WARNING_FLAGS = (
    ("missing slice", "slice_gaps"),
    ("uneven slice spacing", "slice_gaps"),
    ("gantry tilt", "gantry_tilt"),
    ("non-axial", "non_axial"),
    ("oblique axial", "non_axial"),
    ("duplicate slice", "duplicate_slices"),
)
_VESSEL_HU = (100.0, 700.0)
_VESSEL_PERCENTILE = 90  # of the blob's HU: its core, not the partial-volume rim
_VESSEL_MIN_AREA_MM2 = 50.0
_OPEN_RADIUS_MM = 3.0


def volume_flags(warnings: Sequence[str]) -> List[str]:
    """Study flags for the loader's warnings (``Volume.warnings``), in first-seen order, without duplicates."""
    out: List[str] = []
    for w in warnings:
        low = str(w).lower()
        for key, flag in _WARNING_FLAGS:
            if key in low and flag not in out:
                out.append(flag)
    return out


def mask_has_bone(hu3: np.ndarray, mask: np.ndarray, min_bone_hu: float) -> Tuple[bool, Optional[float]]:
    """Whether a sagittal mask holds bone: 95th percentile of its HU over the slices ≥ ``min_bone_hu``.

    Args:
        hu3: float ``(S, H, W)`` HU of the sagittal slices.
        mask: bool ``(H, W)``.
        min_bone_hu: threshold in HU.

    Returns:
        ``(has_bone, p95_hu)``; an empty mask or one entirely outside the volume (NaN) has no bone.
    """
    vals = np.asarray(hu3)[:, mask].reshape(-1)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return False, None
    p95 = float(np.percentile(vals, 95))
    return p95 >= min_bone_hu, p95


def metal_in_mask(hu3: np.ndarray, mask: np.ndarray, metal_hu: float, *, volume=None,
                  transform: Optional[np.ndarray] = None, half_width_mm: float = 5.0) -> bool:
    """Whether HU ≥ ``metal_hu`` occurs in the mask on the sagittal slices or in its 3-D extrusion.

    Args:
        hu3: float ``(S, H, W)`` sagittal HU.
        mask: bool ``(H, W)`` (not eroded: screws sit in the pedicles and the body's border as well).
        metal_hu: threshold in HU.
        volume: the source ``Volume`` (optional) and ``transform`` the sagittal 4×4 ``(col, row, ch-1, 1)`` → LPS:
            the mask is also sampled ±``half_width_mm`` perpendicular to the plane (nearest voxel).
    """
    vals = np.asarray(hu3)[:, mask]
    if np.any(vals[np.isfinite(vals)] >= metal_hu):
        return True
    if volume is None or transform is None or not mask.any():
        return False
    from .classical import core_points_lps

    pts = core_points_lps(transform, mask, half_width_mm)
    inv = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64))
    ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    K, J, I = volume.data.shape
    ok = (ijk[:, 0] >= 0) & (ijk[:, 0] < I) & (ijk[:, 1] >= 0) & (ijk[:, 1] < J) & (ijk[:, 2] >= 0) & (ijk[:, 2] < K)
    ijk = ijk[ok]
    return bool(ijk.size and np.any(volume.data[ijk[:, 2], ijk[:, 1], ijk[:, 0]] >= metal_hu))


def genant_grade(loss: Optional[float], thresholds: Sequence[float] = (0.20, 0.25, 0.40)) -> Optional[int]:
    """Genant semi-quantitative grade 0–3 of a height reduction fraction (None stays None).

    Grade 0: < 20 %, 1 (mild): 20–25 %, 2 (moderate): 25–40 %, 3 (severe): ≥ 40 % (``thresholds`` ascending).
    """
    if loss is None or not math.isfinite(loss):
        return None
    return int(sum(loss >= t for t in thresholds))


def height_loss(heights: Dict[str, Optional[float]], neighbours: Sequence[Dict[str, Optional[float]]] = ()
                ) -> Optional[float]:
    """Height reduction fraction of one vertebral body (0 = none; None when its heights are unknown).

    Args:
        heights: ``{"anterior", "middle", "posterior"}`` mm of this body.
        neighbours: the same dicts of adjacent vertebral bodies (up to two on each side).

    Returns:
        ``max(1 - min/max of its own heights, 1 - its max / median of the neighbours' max heights)``, ≥ 0.
    """
    h = [heights.get(k) for k in ("anterior", "middle", "posterior")]
    if any(x is None or not x > 0 for x in h):
        return None
    loss = 1.0 - min(h) / max(h)
    refs = [max(v for v in n.values() if v) for n in neighbours
            if n and all(n.get(k) for k in ("anterior", "middle", "posterior"))]
    if refs:
        loss = max(loss, 1.0 - max(h) / float(np.median(refs)))
    return max(0.0, float(loss))


def _sample_axial_patch(volume, centre_lps: np.ndarray, x_range: Tuple[float, float],
                        y_range: Tuple[float, float], step: float = 1.0) -> np.ndarray:
    """HU ``(ny, nx)`` of the axial LPS patch at ``centre_lps[2]`` (trilinear; outside the volume -1000)."""
    xs = centre_lps[0] + np.arange(x_range[0], x_range[1] + 1e-6, step)
    ys = centre_lps[1] + np.arange(y_range[0], y_range[1] + 1e-6, step)
    X, Y = np.meshgrid(xs, ys)
    pts = np.stack([X.ravel(), Y.ravel(), np.full(X.size, centre_lps[2])], 1)
    inv = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64))
    ijk = pts @ inv[:3, :3].T + inv[:3, 3]
    vals = map_coordinates_f32(volume.data, ijk[:, [2, 1, 0]].T, order=1, mode="constant", cval=-1000.0)
    return vals.reshape(X.shape)


def vessel_hu_in_front(volume, anterior_lps: np.ndarray) -> Optional[float]:
    """90th-percentile HU of the brightest vessel-sized blob in front of a vertebral body, or None (method above).

    Args:
        volume: the source ``Volume``.
        anterior_lps: LPS (mm) of the body's anterior cortex at its centre height.
    """
    patch = _sample_axial_patch(volume, np.asarray(anterior_lps, float), (-35.0, 45.0), (-45.0, -2.0))
    cand = (patch >= _VESSEL_HU[0]) & (patch <= _VESSEL_HU[1])
    r = _OPEN_RADIUS_MM
    yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
    cand = ndimage.binary_opening(cand, structure=(xx * xx + yy * yy) <= r * r)
    lab, n = ndimage.label(cand)
    if n == 0:
        return None
    sizes = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
    big = [i + 1 for i in range(n) if sizes[i] >= _VESSEL_MIN_AREA_MM2]
    if not big:
        return None
    best = max(big, key=lambda i: float(np.median(patch[lab == i])))
    return float(np.percentile(patch[lab == best], _VESSEL_PERCENTILE))


def contrast_check(volume, vertebrae, transform: np.ndarray, contrast_hu: float) -> Dict[str, Any]:
    """Whether the scan is contrast-enhanced, from the vessels in front of the measured vertebral bodies.

    Args:
        volume: the source ``Volume``.
        vertebrae: :class:`~bmd_d2.measure.result.VertebraResult` list (bodies with masks are used).
        transform: sagittal 4×4 ``(col, row, channel - 1, 1)`` → LPS (column axis anterior → posterior).
        contrast_hu: median vessel HU at or above which the scan counts as enhanced.

    Returns:
        ``{"enhanced": bool or None (not assessed), "vessel_hu": median HU or None, "levels_sampled": n,
        "levels_with_vessel": k, "method": ...}``.
    """
    out: Dict[str, Any] = {"enhanced": None, "vessel_hu": None, "levels_sampled": 0, "levels_with_vessel": 0,
                           "method": "p90 HU of the brightest vessel-sized blob (100-700 HU) in front of each vertebral body"}
    t = np.asarray(transform, dtype=np.float64)
    found = []
    for v in vertebrae:
        if v.category_id != 0 or v.mask is None or not v.mask.any() or "metal" in v.qc_flags:
            continue
        rows, cols = np.nonzero(v.mask)
        cy = float(rows.mean())
        near = np.abs(rows - cy) <= 2
        col_a = float(cols[near].min()) if near.any() else float(cols.min())
        anterior = (t @ [col_a, cy, 0.0, 1.0])[:3]
        out["levels_sampled"] += 1
        hu = vessel_hu_in_front(volume, anterior)
        if hu is not None:
            found.append(hu)
    out["levels_with_vessel"] = len(found)
    if out["levels_sampled"] == 0:
        return out
    if found and 2 * len(found) >= out["levels_sampled"]:
        out["vessel_hu"] = float(np.median(found))
        out["enhanced"] = out["vessel_hu"] >= contrast_hu
    else:
        out["enhanced"] = False
    return out
