"""Voxel-grid geometry of the renderer: boxes around rotated structures, local coordinates, partial-volume shapes.

Partial volume is analytic: every edge is a linear ramp whose width is the voxel footprint (pixel spacing in-plane,
slice *thickness* through-plane) projected on the edge normal. Structures are rendered in small index boxes around
them, in float32.
"""
import math
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage


class Grid:
    """Voxel grid helper: boxes around rotated structures and their local coordinates (float32).

    Args:
        shape: ``(K, J, I)`` volume shape.
        origin: LPS mm of voxel ``(0, 0, 0)``.
        spacing_xyz: ``(dx, dy, dz)`` mm.
        thickness: slice thickness in mm (the through-plane voxel footprint).
    """

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
        dx, dy, dz = self._offsets(sl, center)
        R = np.asarray(R, np.float32)
        return tuple(R[0, c] * dx + R[1, c] * dy + R[2, c] * dz for c in range(3))

    def capsule_d(self, sl, pa, pb, r):
        """Signed distance (mm) from the voxels of box ``sl`` to a capsule of radius r around segment pa→pb."""
        dx, dy, dz = self._offsets(sl, pa)
        ab = np.asarray(pb, np.float32) - np.asarray(pa, np.float32)
        L2 = float(ab @ ab)
        t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / L2, 0.0, 1.0)
        return np.sqrt((dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2) - r

    def _offsets(self, sl, point):
        """float32 x, y, z offsets (mm) of the voxels of box ``sl`` from ``point``, broadcastable to the box."""
        dx = (self.x[sl[2]] - np.float32(point[0]))[None, None, :]
        dy = (self.y[sl[1]] - np.float32(point[1]))[None, :, None]
        dz = (self.z[sl[0]] - np.float32(point[2]))[:, None, None]
        return dx, dy, dz


def rotation(tilt_deg: float, lateral_deg: float, axial_deg: float) -> np.ndarray:
    """Rotation (columns = local u/v/w axes in LPS) of a vertebra: axial rotation, then lateral and sagittal tilt."""
    a, b, c = np.radians([tilt_deg, lateral_deg, axial_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def ramp(d, w):
    """Partial-volume fraction of a voxel at signed distance ``d`` (mm, < 0 inside) from an edge of ramp width w."""
    return np.clip(np.float32(0.5) - d * np.float32(1.0 / max(w, 1e-3)), 0.0, 1.0)


def ellipsoid_frac(u, v, w, axes, width):
    """Fraction inside an ellipsoid with semi-axes ``axes`` (mm) centred at the local origin."""
    r = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2)
    rho = np.sqrt(u * u + v * v + w * w)
    d = rho * (1.0 - 1.0 / np.maximum(r, 1e-4))
    return ramp(d, width)


def superellipse_d(u, v, a, b, p=2.4, notch=0.0):
    """Signed in-plane distance (mm, along the ray from the centre) to a superellipse with half-axes a, b.

    ``notch`` > 0 indents the posterior (+v) wall near the midline (kidney-shaped vertebral body).
    """
    if notch:
        b = np.where(v > 0, b * (1.0 - notch * np.exp(-(u / (0.35 * a)) ** 2)), b)
    r = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)
    rho = np.sqrt(u * u + v * v)
    return rho * (1.0 - 1.0 / np.maximum(r, 1e-4))


def paint(vol, sl, frac, value):
    """Composite ``value`` (scalar or box array) with coverage ``frac`` over ``vol[sl]`` in place."""
    view = vol[sl]
    view += frac * (value - view)


def body_fracs(g: Grid, sl, center, R, h, depth, width, cortex, collapse=0.0, endplate=None):
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
    dxy = superellipse_d(u, v, a * waist, b * waist, 2.4, notch=0.12)
    q = np.clip(1.0 - (u / a) ** 2 - (v / b) ** 2, 0.0, 1.0)
    cup = 1.2 * q  # concave endplates
    top = h / 2 - cup
    if collapse:
        top = top - collapse * np.clip((b - v) / (2 * b), 0.0, 1.0)
    bottom = -h / 2 + cup
    dz = np.maximum(w - top, bottom - w)
    wxy = 0.5 * (g.width(R[:, 0]) + g.width(R[:, 1]))
    wz = g.width(R[:, 2])
    f_body = ramp(dxy, wxy) * ramp(dz, wz)
    f_lat = ramp(dxy + cortex, wxy)
    f_core = f_lat * ramp(dz + (cortex if endplate is None else endplate), wz)
    f_endplates = f_lat * ramp(dz, wz) - f_core
    return f_body, f_core, f_endplates, (u, v, w)


def _unit_noise(rng, shape, sigma_px) -> np.ndarray:
    """Gaussian-filtered white noise, float32 ``shape``, shifted and scaled to zero mean and unit σ."""
    white = rng.standard_normal(shape, dtype=np.float32)
    f = ndimage.gaussian_filter(white, sigma_px, mode="reflect", truncate=2.5)
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def local_texture(rng, uvw, half_mm, sigma_mm=(1.1, 0.6, 0.6), step_mm=0.4):
    """Zero-mean unit-σ trabecular texture fixed in a vertebra's own frame (generator v7): the same filtered white
    noise as :func:`texture` (``sigma_mm`` along the local w, v, u axes: vertical struts), drawn on a ``step_mm``
    lattice over the local box ``±half_mm`` (u, v, w) and sampled (trilinear) at the voxels' local coordinates
    ``uvw``, so that a re-scan (another grid position) samples the same bone."""
    n = [int(math.ceil(2 * hm / step_mm)) + 2 for hm in half_mm[::-1]]  # lattice (w, v, u)
    f = _unit_noise(rng, n, [sg / step_mm for sg in sigma_mm])
    coords = [(np.asarray(c, np.float32) + np.float32(hm)) / np.float32(step_mm)
              for c, hm in zip(uvw[::-1], half_mm[::-1])]
    return ndimage.map_coordinates(f, coords, order=1, mode="nearest").astype(np.float32)


def texture(rng, shape, g: Grid, sigma_mm=(1.1, 0.6, 0.6)):
    """Zero-mean unit-σ trabecular texture, float32 ``shape``: filtered white noise, anisotropic (vertical struts)."""
    return _unit_noise(rng, shape, (sigma_mm[0] / g.sp[2], sigma_mm[1] / g.sp[1], sigma_mm[2] / g.sp[0]))
