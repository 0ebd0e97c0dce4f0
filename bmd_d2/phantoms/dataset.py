"""Rendering a study from its seed and writing a dataset of studies with its BMD table.

A study's seed is split into four independent streams (parameters, image, noise, DICOM encoding), so fixing one
option or changing the encoding never changes the other draws.
"""
import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from bmd_d2.levels import LEVEL_TO_LABEL, LEVELS
from bmd_d2.utils.files import json_ready

from . import anatomy
from .background import render_background
from .options import PhantomOptions, PhantomStudy, study_id_for, study_seed
from .render import SpineRenderer, add_noise, apply_psf
from .writers import CSV_FIELDS, write_bmd_csv, write_study

logger = logging.getLogger(__name__)

__all__ = ["generate_dataset", "generate_study"]


def _truth(p: Dict, vol: np.ndarray, labels: np.ndarray, cores: np.ndarray, spine: SpineRenderer) -> List[Dict]:
    """One truth record per level labelled (at least half in view, a non-empty core), cranial → caudal; the core HU
    is measured on ``vol`` as it is before noise (v5: after the scanner's gain/offset)."""
    truth = []
    qct = p.get("qct_calibration")
    for name in LEVELS:
        info = spine.level_info.get(name)
        sl = spine.level_boxes.get(name)
        if info is None or sl is None or info["in_view"] < 0.5:
            continue
        lv = LEVEL_TO_LABEL[name]
        m = cores[sl] == lv
        if not m.any():
            continue
        trab_hu = float(vol[sl][m].mean(dtype=np.float64))
        if qct is None:  # v4: one calibration line for every bone
            calibrated = anatomy.hu_of_density(p, info["bmd"])
        else:  # v5: the level's trabecular bone through the spectrum, then the scanner's gain/offset
            calibrated = p["hu_gain"] * anatomy.bone_hu(p, info["bmd"], "trabecular", LEVELS.index(name)) \
                + p["hu_offset"]
        rec = dict(
            level=name, label=lv, bmd_mg_cm3=round(info["bmd"], 3),
            trabecular_hu=round(trab_hu, 3),
            calibrated_hu=round(calibrated, 3),
            core_voxels=int(m.sum()), body_voxels=int((labels[sl] == lv).sum()),
            in_view=round(info["in_view"], 3), fractured=info["fractured"],
            metal=bool(p["metal"] and name in p["metal_levels"]),
            height_mm=round(info["height_mm"], 2), depth_mm=round(info["depth_mm"], 2),
            width_mm=round(info["width_mm"], 2),
        )
        if qct is not None:  # what an ideal phantom QCT reads of this trabecular bone, and its marrow-fat bias
            # (its own HU, without the partial volume of the cortical shell that the blur spreads into the core's rim:
            # a QCT ROI keeps away from the cortex, and trabecular_hu - calibrated_hu is up to 8 HU on 1 mm series)
            qct_bmd = (calibrated - qct["intercept"]) / qct["slope"]
            rec.update(fat_fraction=round(p["marrow_fat_fraction_levels"][LEVELS.index(name)], 4),
                       qct_bmd_mg_cm3=round(qct_bmd, 3), fat_bias_mg_cm3=round(qct_bmd - info["bmd"], 3))
        truth.append(rec)
    return truth


def _pad_outside_fov(vol: np.ndarray) -> None:
    """Set the pixels outside the reconstruction circle to the padding value -3024 HU, in place."""
    n = vol.shape[1]
    yy, xx = np.mgrid[:n, :n]
    outside = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (n / 2) ** 2
    vol[:, outside] = -3024.0


def _anchor_truth(p: Dict, spine: SpineRenderer) -> Dict:
    """v6: the truth of the two level anchors: the last rib-bearing level, the top of the fused sacral mass (the
    level a count from the sacrum calls S1) and the sacroiliac joints."""
    ribs, lumbar = int(p["rib_pairs"]), int(p["lumbar_vertebrae"])
    return dict(rib_pairs=ribs, lumbar_vertebrae=lumbar, transitional=bool(ribs != 12 or lumbar != 5),
                pelvis_in_view=not p.get("scan_ends_in"),
                last_rib_level={11: "T11", 12: "T12", 13: "L1"}[ribs],
                sacrum_top_level={4: "L5", 5: "S1", 6: "S2"}[lumbar],
                sacrum_top_lps=spine.si_joints.get("top_point_lps"), si_joint_z_mm=spine.si_joints.get("z_mm"))


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
    p = anatomy.draw_params(np.random.default_rng(s_par), opts)
    if opts.rescan_seed is not None:  # same patient and scanner; new position, scan start and noise
        s_pos, s_noise = np.random.SeedSequence([int(seed), int(opts.rescan_seed), 0x5E5CA9]).spawn(2)
        anatomy.redraw_position(p, np.random.default_rng(s_pos))
    style = anatomy.draw_style(np.random.default_rng(s_dcm), opts)
    lay = anatomy.lay_out(p, opts)
    img_rng = np.random.default_rng(s_img)
    vol = render_background(lay, p, img_rng)
    labels = np.zeros(vol.shape, np.uint8)
    cores = np.zeros(vol.shape, np.uint8)
    spine = SpineRenderer(lay, p, img_rng)
    spine.render(vol, labels, cores)
    apply_psf(vol, p, lay.g, spine.region)
    if "hu_gain" in p:  # v5: the scanner's water-calibration error, on every voxel (linear: commutes with the PSF)
        vol *= np.float32(p["hu_gain"])
        vol += np.float32(p["hu_offset"])
    truth = _truth(p, vol, labels, cores, spine)
    add_noise(vol, p, np.random.default_rng(s_noise))
    if style.fov_padding:
        _pad_outside_fov(vol)
    lo, hi = style.hu_range
    np.clip(vol, lo, hi, out=vol)
    params = dict(p)
    params.update(
        seed=int(seed), matrix=int(vol.shape[1]), n_slices=int(vol.shape[0]),
        **({"rescan_seed": int(opts.rescan_seed)} if opts.rescan_seed is not None else {}),
        dicom=dataclasses.asdict(style),
        levels={k: {kk: vv for kk, vv in v.items()} for k, v in spine.level_info.items()},
        spine_centers_lps={LEVELS[i]: [round(float(x), 3) for x in lay.fr["center"][i]] for i in range(len(LEVELS))},
        **({"level_anchors": _anchor_truth(p, spine)} if p.get("pelvis") == "sacroiliac" else {}),
    )
    return PhantomStudy(
        study_id=study_id or f"phantom_{seed}", seed=int(seed), hu=vol, affine=lay.affine, labels=labels, cores=cores,
        truth=truth, params=json_ready(params, nonfinite_to_none=False), style=style,
        slice_thickness=float(p["slice_thickness"]), generator_version=int(opts.generator_version),
    )


def generate_dataset(root, n: int, seed: int = 0, options: Optional[PhantomOptions] = None, start: int = 0,
                     progress: bool = True, prefix: str = "phantom") -> List[str]:
    """Write studies ``start … start+n-1`` under ``root/studies/`` and (re)write ``root/bmd.csv``.

    ``bmd.csv`` is updated (atomically) after every study, so an interrupted run keeps the truth of every finished
    study and can be continued with ``start``. Study ``i`` uses seed :func:`study_seed(seed, i)` and id
    :func:`study_id_for(i)`, so a dataset can be generated in chunks (or regenerated partly) with identical results.

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
        rows = [dict(study_id=sid, **{k: t.get(k) for k in CSV_FIELDS[1:]}) for t in st.truth]
        write_bmd_csv(root / "bmd.csv", rows, replace_studies=[sid])
        ids.append(sid)
        logger.debug("wrote %s (%d slices, %d levels)", sid, st.hu.shape[0], len(st.truth))
    return ids
