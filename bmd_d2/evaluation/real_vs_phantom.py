"""The real example CT against phantoms rendered at its resolution: tissue HU, noise and vertebral-body geometry,
measured the same way on both; behind ``tools/compare_real_phantom.py`` (findings in docs/real_vs_phantom.md).

The measurements are anatomically defined where possible so that no threshold decides the answer:

* tissue HU distributions (p5 / p25 / median / p75 / p95):
  - ``fat``: voxels of the patient's body in the adipose window −190…−30 HU (the window is the standard definition of
    adipose tissue; the median inside it is what is compared);
  - ``muscle``: paraspinal (erector spinae) boxes behind each labelled body: 25–60 mm posterior of the body centre,
    15–45 mm either side, over the body's height (all voxels, so fat between and in the muscles counts), and the same
    voxels inside the skeletal-muscle window −29…150 HU;
  - ``trabecular``: body labels eroded by one voxel (3 mm);
  - ``cortical``: the body labels' one-voxel outer shell (at 3 mm a partial-volume mix of cortex and neighbours);
  - ``disc``: voxels between two consecutive bodies inside both bodies' axial footprints (for the real CT also
    TotalSegmentator's own disc label, as a cross-check);
* noise: median local SD (3 × 3 in-plane window) inside eroded fat, and the trabecular SD (texture + noise);
* geometry per labelled level: height (cranio-caudal), AP depth and lateral width (extents of the label), volume,
  and the centre-to-centre spacing of consecutive levels.
"""
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage

from .real_ct import BODY_LABELS

logger = logging.getLogger(__name__)

__all__ = ["REAL_BODY_LEVELS", "TISSUES", "body_mask", "tissue_samples", "noise_sd", "body_geometry", "analyse",
           "load_real", "phantom", "format_report"]

REAL_BODY_LEVELS = BODY_LABELS  # TotalSegmentator's vertebral-body labels of the real CT
TISSUES = ("fat", "muscle", "muscle -29..150", "trabecular", "cortical", "disc")


def body_mask(hu: np.ndarray) -> np.ndarray:
    """bool (K, J, I): the patient's body: per slice the largest region above −500 HU after an opening (no table)."""
    out = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        m = ndimage.binary_opening(hu[k] > -500.0, iterations=2)
        lab, n = ndimage.label(m)
        if n:
            sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
            out[k] = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
    return out


def _dist(values: np.ndarray) -> Dict[str, float]:
    """Percentiles, mean and SD of a 1-D sample (NaN when empty)."""
    if values.size == 0:
        return {k: float("nan") for k in ("n", "p5", "p25", "median", "p75", "p95", "mean", "sd")}
    p = np.percentile(values, [5, 25, 50, 75, 95])
    return dict(n=float(values.size), p5=p[0], p25=p[1], median=p[2], p75=p[3], p95=p[4], mean=float(values.mean()),
                sd=float(values.std()))


def _lps_grid(affine: np.ndarray, shape) -> np.ndarray:
    """LPS mm of every voxel centre, (K, J, I, 3)."""
    K, J, I = shape
    kk, jj, ii = np.meshgrid(np.arange(K), np.arange(J), np.arange(I), indexing="ij")
    ijk = np.stack([ii, jj, kk], -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def tissue_samples(hu: np.ndarray, affine: np.ndarray, bodies: np.ndarray,
                   disc_label: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """HU samples per tissue (definitions in the module docstring).

    Args:
        hu: float (K, J, I) HU.
        affine: (4, 4) index → LPS.
        bodies: int (K, J, I) vertebral-body labels (0 = background, one value per level).
        disc_label: optional bool (K, J, I) disc mask from a segmentation (cross-check, real CT only).
    """
    out: Dict[str, np.ndarray] = {}
    body = body_mask(hu)
    fat = body & (hu >= -190) & (hu <= -30)
    out["fat"] = hu[fat]
    levels = sorted(set(np.unique(bodies).tolist()) - {0})
    lab_any = bodies > 0
    ero = np.zeros_like(lab_any)
    for v in levels:
        m = bodies == v
        ero |= ndimage.binary_erosion(m)
    out["trabecular"] = hu[ero]
    out["cortical"] = hu[lab_any & ~ero]
    # muscle: paraspinal boxes behind each body
    xyz = _lps_grid(affine, hu.shape)
    musc = np.zeros(hu.shape, bool)
    for v in levels:
        pts = xyz[bodies == v]
        c = pts.mean(0)
        z0, z1 = pts[:, 2].min(), pts[:, 2].max()
        dy = xyz[..., 1] - c[1]
        dx = np.abs(xyz[..., 0] - c[0])
        musc |= (dy >= 25) & (dy <= 60) & (dx >= 15) & (dx <= 45) & (xyz[..., 2] >= z0) & (xyz[..., 2] <= z1)
    out["muscle"] = hu[musc & body]
    out["muscle -29..150"] = out["muscle"][(out["muscle"] >= -29) & (out["muscle"] <= 150)]  # skeletal-muscle window
    # discs between consecutive bodies, inside both footprints
    disc = np.zeros(hu.shape, bool)
    order = sorted(levels, key=lambda v: xyz[bodies == v][:, 2].mean())  # inferior → superior
    for lo_v, hi_v in zip(order[:-1], order[1:]):
        lo_m, hi_m = bodies == lo_v, bodies == hi_v
        foot = ndimage.binary_erosion(lo_m.any(0)) & ndimage.binary_erosion(hi_m.any(0))
        ks = np.arange(hu.shape[0])[:, None, None]
        top_lo = np.where(lo_m, ks, -1).max(0)  # k grows superior (phantoms); handled generally below
        bot_hi = np.where(hi_m, ks, 10 ** 6).min(0)
        if np.median(xyz[..., 2][:, 0, 0][1:] - xyz[..., 2][:, 0, 0][:-1]) < 0:  # k grows inferior
            top_lo = np.where(lo_m, ks, 10 ** 6).min(0)
            bot_hi = np.where(hi_m, ks, -1).max(0)
            between = (ks < top_lo) & (ks > bot_hi)
        else:
            between = (ks > top_lo) & (ks < bot_hi)
        disc |= between & foot[None]
    out["disc"] = hu[disc & ~lab_any]
    if disc_label is not None:
        out["disc (label)"] = hu[disc_label]
    return out


def noise_sd(hu: np.ndarray) -> float:
    """Median local SD (3 × 3 in-plane) inside eroded fat: the image noise where the tissue is homogeneous."""
    fat = body_mask(hu) & (hu >= -190) & (hu <= -30)
    fat = ndimage.binary_erosion(fat, structure=np.ones((1, 3, 3), bool), iterations=2)
    if not fat.any():
        return float("nan")
    m = ndimage.uniform_filter(hu.astype(np.float64), size=(1, 3, 3))
    m2 = ndimage.uniform_filter(hu.astype(np.float64) ** 2, size=(1, 3, 3))
    sd = np.sqrt(np.maximum(m2 - m * m, 0.0)) * 3.0 / np.sqrt(8.0)  # unbiased over the 9 samples
    return float(np.median(sd[fat]))


def body_geometry(affine: np.ndarray, bodies: np.ndarray, names: Dict[int, str]) -> List[Dict]:
    """Per level (inferior → superior order reversed to cranial → caudal): height, depth, width, volume, spacing."""
    xyz_of = {}
    vox_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    step = np.abs(np.diag(affine[:3, :3]))
    for v in sorted(set(np.unique(bodies).tolist()) - {0}):
        ijk = np.argwhere(bodies == v)[:, ::-1].astype(np.float64)
        xyz_of[v] = ijk @ affine[:3, :3].T + affine[:3, 3]
    rows = []
    order = sorted(xyz_of, key=lambda v: -xyz_of[v][:, 2].mean())  # cranial first
    prev = None
    for v in order:
        p = xyz_of[v]
        c = p.mean(0)
        ext = p.max(0) - p.min(0) + step
        rows.append(dict(level=names.get(v, str(v)), height=ext[2], depth=ext[1], width=ext[0],
                         volume_ml=len(p) * vox_ml,
                         spacing=float(np.linalg.norm(c - prev)) if prev is not None else float("nan")))
        prev = c
    return rows


def analyse(name: str, hu: np.ndarray, affine: np.ndarray, bodies: np.ndarray, names: Dict[int, str],
            disc_label: Optional[np.ndarray] = None) -> Dict:
    """All measurements of one study."""
    return dict(name=name, tissues={k: _dist(v) for k, v in tissue_samples(hu, affine, bodies, disc_label).items()},
                noise=noise_sd(hu), geometry=body_geometry(affine, bodies, names),
                trab_sd=float(np.std(hu[_eroded(bodies)])) if (bodies > 0).any() else float("nan"))


def _eroded(bodies: np.ndarray) -> np.ndarray:
    out = np.zeros(bodies.shape, bool)
    for v in set(np.unique(bodies).tolist()) - {0}:
        out |= ndimage.binary_erosion(bodies == v)
    return out


def load_real(folder: str) -> Dict:
    """The real CT with its body labels and the TotalSegmentator disc label."""
    from bmd_d2.data.dicom import load_nifti

    vol = load_nifti(os.path.join(folder, "example_ct.nii.gz"))
    lab = load_nifti(os.path.join(folder, "totalseg_vertebrae_pp_refined.nii.gz"), dtype=np.int16)
    bd_path = os.path.join(folder, "totalseg_vertebrae_body.nii.gz")
    disc = load_nifti(bd_path, dtype=np.int16).data == 2 if os.path.exists(bd_path) else None
    return analyse("real example_ct", vol.data, vol.affine, lab.data.astype(np.int16), REAL_BODY_LEVELS, disc)


def phantom(seed: int) -> Dict:
    """A phantom rendered at the real CT's resolution (3 mm pixels, 3 mm slices, 128² matrix = 384 mm FOV)."""
    from bmd_d2.levels import LEVELS
    from bmd_d2.phantoms import PhantomOptions, generate_study

    st = generate_study(seed, PhantomOptions(matrix=128, pixel_spacing=3.0, slice_thickness=3.0, slice_spacing=3.0,
                                             preview=False))
    names = {i + 1: lv for i, lv in enumerate(LEVELS)}
    out = analyse(f"phantom seed {seed}", st.quantized_hu(), st.affine, st.labels.astype(np.int16), names)
    p = st.params
    out["params"] = dict(bmd=p["bmd_mg_cm3"], fat=p["fat_hu"], muscle=p["muscle_hu"], disc=p["disc_hu"],
                         noise=p["noise_sd"], contrast=p["contrast"], cortex_mm=p["cortex_mm"])
    return out


def format_report(results: List[Dict]) -> str:
    """Tables: tissue HU, noise, geometry (what ``tools/compare_real_phantom.py`` prints), without the final
    newline."""
    lines: List[str] = ["\n== Tissue HU (p5 / p25 / median / p75 / p95) =="]
    for t in TISSUES + ("disc (label)",):
        for r in results:
            d = r["tissues"].get(t)
            if d is None:
                continue
            lines.append(f"{t:16s} {r['name']:18s} n={int(d['n']) if d['n'] == d['n'] else 0:7d}  "
                         f"{d['p5']:7.0f} {d['p25']:7.0f} {d['median']:7.0f} {d['p75']:7.0f} {d['p95']:7.0f}")
    lines.append("\n== Noise and texture ==")
    for r in results:
        extra = ""
        if "params" in r:
            pr = r["params"]
            extra = (f"  [drawn: noise σ {pr['noise']:.1f}, BMD {pr['bmd']:.0f} mg/cm³, "
                     f"cortex {pr['cortex_mm']:.2f} mm, contrast {pr['contrast']}]")
        lines.append(f"{r['name']:18s} fat local SD {r['noise']:6.1f} HU   trabecular SD {r['trab_sd']:6.1f} HU"
                     + extra)
    lines.append("\n== Vertebral bodies (mm, ml) ==")
    for r in results:
        lines.append(r["name"])
        for g in r["geometry"]:
            lines.append(f"   {g['level']:4s} height {g['height']:5.1f} depth {g['depth']:5.1f} "
                         f"width {g['width']:5.1f} volume {g['volume_ml']:5.1f} ml  spacing to previous "
                         f"{g['spacing']:5.1f}")
    return "\n".join(lines)
