#!/usr/bin/env python
"""Pictures of the two level anchors (issue 18) for docs/measurement.md: a phantom and the real example CT.

Each study is measured as ``bmd-measure`` does (:class:`bmd_d2.measure.BMDStudyPredictor`: sagittal image, model,
levels from the sacrum detection and the sacrum and last rib found in 3-D); the ribs are traced again along the plane
the sagittal image was cut on (:func:`bmd_d2.measure.anchors.find_ribs`, deterministic: the measurement's own answer,
with the traces' paths); the 3-D sacrum is result.json's ``levels.sacrum_anchor``. Two panels on the anchors' 2 mm
LPS grid (:func:`bmd_d2.measure.anchors.spine_grid`):

* coronal maximum-intensity projection over the ribs' AP window (120 mm in front of to 90 mm behind the vertebral
  body), patient right on the left: the traced ribs in colour (left / right side), the costovertebral joints (circles,
  where the count takes them: extrapolated to 25 mm from the midline), the labelled vertebrae at their 3-D centres
  the sacrum detection (S1, where found) and the 3-D sacrum that anchor the count from below: its sacroiliac joints
  (red bars: the z range where the bone of the sacral body joins both ilia) and their top (the count's anchor);
* axial maximum-intensity projection of the slab holding the lowest rib pair (from 45 mm below to 10 mm above its
  joints; anterior up): the same ribs from above.

The caption line gives ``levels.levels_anchor``, ``levels.sacrum_source``, ``levels.rib_pairs_in_view`` and the
study's QC flags of result.json. PNGs are palette-quantised (≤ 150 kB).

Usage::

    python tools/make_anchor_figures.py [--weights models/bmd_rcnn_MFEFPN_R18_cpu.pth] [--seed 0] [--out docs/images]

Writes ``anchors_phantom.png`` (full-size generator-v6 phantom ``--seed``) and ``anchors_real_ct.png``
(tests/data/real/totalseg_example_ct/example_ct.nii.gz; ``--ct`` for another NIfTI). Exit code 2 with one ``error:``
line for a bad config, weights or CT file.
"""
import argparse
import io
import logging
import os
import sys

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from bmd_d2.measure.anchors import RIB_AP_MM, RIB_JOINT_MM  # noqa: E402

logger = logging.getLogger("make_anchor_figures")

REAL_CT = os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct", "example_ct.nii.gz")
CONFIG = os.path.join(ROOT, "configs", "bmd_default.yaml")  # the shipped model's config
WEIGHTS = os.path.join(ROOT, "models", "bmd_rcnn_MFEFPN_R18_cpu.pth")
HALF_WIDTH_MM = 175.0  # lateral extent shown either side of the midline
SIDE_COLOUR = {"left": "#ff8c1a", "right": "#1ac6ff"}
MAX_PNG_BYTES = 150_000


def measure(volume, cfg):
    """The study result of ``volume`` as ``bmd-measure`` gives it, and the rib anchor with its traces."""
    from bmd_d2.measure import BMDStudyPredictor
    from bmd_d2.measure.anchors import find_ribs, plane_of_sagittal, spine_grid

    result = BMDStudyPredictor(cfg)(volume, study_id="anchors")
    plane = plane_of_sagittal(result.sagittal)
    grid = spine_grid(volume, plane) if plane is not None else None
    ribs = find_ribs(volume, plane, grid=grid) if grid is not None else None
    return result, grid, ribs


def _mip_coronal(g) -> np.ndarray:
    """(Z, X) maximum over the ribs' AP window per axial row."""
    dy = g.ys[None, :] - g.yb[:, None]
    win = (dy >= RIB_AP_MM[0]) & (dy <= RIB_AP_MM[1])
    return np.where(win[:, :, None], g.C, -1000.0).max(1)


def _png_bytes(fig) -> bytes:
    """The figure as a palette PNG (256 colours, octree): a few times smaller than RGB, colours and text kept."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _joint_x(g, z: float, sign: float) -> float:
    """LPS x of a costovertebral joint at height ``z``: ``RIB_JOINT_MM`` from the midline (sign + = left)."""
    return float(g.x_mid(np.interp(z, g.zs, g.yb), z)) + sign * RIB_JOINT_MM


def draw(result, g, ribs, title: str, path: str) -> int:
    """Write the two-panel picture of one study to ``path``; returns its size in bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = result.levels or {}
    flags = ", ".join(result.qc_flags) or "none"
    caption = (f"levels_anchor: {lv.get('levels_anchor')}  |  sacrum_source: {lv.get('sacrum_source')}  |  "
               f"rib_pairs_in_view: {lv.get('rib_pairs_in_view')}  |  flags: {flags}")
    zc = float(np.median(g.zs))
    xm0 = float(g.x_mid(np.interp(zc, g.zs, g.yb), zc))
    z_span = float(g.zs[-1] - g.zs[0])
    height = float(np.clip(2.9 * z_span / (2 * HALF_WIDTH_MM) + 1.9, 4.6, 7.6))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, height), dpi=100, gridspec_kw=dict(width_ratios=[1.15, 1.0]))
    fig.patch.set_facecolor("white")
    # coronal MIP: x (LPS, + = patient left) to the right, so the patient's right is on the viewer's left
    cor = _mip_coronal(g)
    ext = [g.xs[0] - g.step / 2, g.xs[-1] + g.step / 2, g.zs[0] - g.step / 2, g.zs[-1] + g.step / 2]
    ax.imshow(cor, cmap="gray", vmin=-100, vmax=900, origin="lower", extent=ext, interpolation="bilinear")
    ax.set_xlim(xm0 - HALF_WIDTH_MM, xm0 + HALF_WIDTH_MM)
    ax.set_ylim(g.zs[0] - 4.0, g.zs[-1] + 16.0)  # room for the labels of a pair at the top of the field of view
    ax.set_aspect("equal")
    ax.set_title("coronal MIP (ribs' AP window)", fontsize=10)
    ax.set_xlabel("x mm (patient right ← → left)", fontsize=9)
    ax.set_ylabel("z mm (superior ↑)", fontsize=9)
    ax.tick_params(labelsize=8)
    pairs = ribs.pairs if ribs is not None else []
    traced = (ribs.evidence.get("ribs") or []) if ribs is not None else []
    for r in traced:
        p = np.asarray(r["path_lps"], float)
        ax.plot(p[:, 0], p[:, 2], "-", color=SIDE_COLOUR[r["side"]], lw=2.2, alpha=0.95)
    box = dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.65)
    for k, pr in enumerate(pairs):
        for side, sgn in (("left", 1.0), ("right", -1.0)):
            z = getattr(pr, side + "_z_mm")
            if z is not None:
                ax.plot(_joint_x(g, z, sgn), z, "o", ms=8, mfc="none", mec="yellow", mew=2.0)
        last = k == len(pairs) - 1
        ax.text(pr.point_lps[0] + 34.0, pr.z_mm + 6.0, "last rib pair" if last else f"rib pair {k + 1}",
                color="yellow", fontsize=8, va="bottom", bbox=box)
    for v in result.vertebrae:
        if v.centroid_lps is None:
            continue
        x, _, z = v.centroid_lps
        if v.category_id == 1:  # the sacrum detection: the count's lower anchor
            ax.plot(x, z, "v", ms=10, color="#ff3030", mec="white")
            ax.text(x - 34.0, z, "S1: sacrum anchor", color="#ff6060", fontsize=9, ha="right", va="center",
                    fontweight="bold", bbox=box)
        elif v.level:
            ax.plot(x, z, "s", ms=5, color="#40ff40", mec="black", mew=0.5)
            ax.text(x - 34.0, z, v.level, color="#40ff40", fontsize=9, ha="right", va="center", fontweight="bold",
                    bbox=box)
    sac = lv.get("sacrum_anchor")
    if sac:  # the 3-D sacrum: its sacroiliac joints (joined slices) and their top, the count's lower anchor
        z0, z1 = sac["evidence"]["si_joint_z_mm"]
        reach = sac["evidence"]["si_joint_reach_mm"]
        x, _, z = sac["point_lps"]
        for sgn in (-1.0, 1.0):
            ax.plot([x + sgn * 0.55 * reach] * 2, [z0, z1], "-", color="#ff3030", lw=3.0, alpha=0.9)
        ax.plot([x - 0.55 * reach, x + 0.55 * reach], [z, z], "--", color="#ff3030", lw=1.5)
        ax.plot(x, z, "v", ms=10, color="#ff3030", mec="white")
        ax.text(x + 0.55 * reach + 8.0, z - 4.0, f"sacrum (3-D): SI joints\ntop, conf. {sac['confidence']:.2f}",
                color="#ff6060", fontsize=8, ha="left", va="top", fontweight="bold", bbox=box)
    if not any(v.category_id == 1 for v in result.vertebrae):
        ax.text(0.02, 0.02, "no sacrum detected (sagittal)", transform=ax.transAxes, color="#ff6060", fontsize=8,
                bbox=box)
    # axial MIP of the slab holding the lowest pair
    if pairs:
        z_low = pairs[-1].z_mm
        sl = (g.zs >= z_low - 45.0) & (g.zs <= z_low + 10.0)
        ax.axhspan(z_low - 45.0, z_low + 10.0, color="white", alpha=0.08)
        ax_img = g.C[sl].max(0)
        yb = float(np.interp(z_low, g.zs, g.yb))
        ext = [g.xs[0] - g.step / 2, g.xs[-1] + g.step / 2, g.ys[-1] + g.step / 2, g.ys[0] - g.step / 2]
        bx.imshow(ax_img, cmap="gray", vmin=-100, vmax=900, extent=ext, interpolation="bilinear")
        for side, sgn in (("left", 1.0), ("right", -1.0)):
            z = getattr(pairs[-1], side + "_z_mm")
            rib = next((r for r in traced if r["side"] == side and r["z_mm"] == z), None)
            if rib is None:
                continue
            p = np.asarray(rib["path_lps"], float)
            bx.plot(p[:, 0], p[:, 1], "-", color=SIDE_COLOUR[side], lw=2.2)
            # the joint at 25 mm from the midline, at the AP depth of the trace's medial end
            bx.plot(_joint_x(g, z, sgn), p[0, 1], "o", ms=8, mfc="none", mec="yellow", mew=2.0)
        bx.set_xlim(xm0 - HALF_WIDTH_MM, xm0 + HALF_WIDTH_MM)
        bx.set_ylim(yb + RIB_AP_MM[1] + 20.0, yb + RIB_AP_MM[0] - 20.0)  # anterior (smaller y) up
        bx.set_title(f"axial MIP, z {z_low - 45:.0f}…{z_low + 10:.0f} mm (last rib pair)", fontsize=10)
    else:
        bx.text(0.5, 0.5, "no rib in view", ha="center", va="center", transform=bx.transAxes)
        bx.set_title("axial MIP", fontsize=10)
    bx.set_aspect("equal")
    bx.set_xlabel("x mm (patient right ← → left)", fontsize=9)
    bx.set_ylabel("y mm (anterior ↑)", fontsize=9)
    bx.tick_params(labelsize=8)
    handles = [plt.Line2D([], [], color=c, lw=2.2, label=f"traced rib, {s}") for s, c in SIDE_COLOUR.items()]
    handles.append(plt.Line2D([], [], ls="none", marker="o", mfc="none", mec="yellow", mew=2, ms=8,
                              label="costovertebral joint"))
    handles.append(plt.Line2D([], [], color="#ff3030", lw=3.0, label="sacroiliac joints (left panel)"))
    bx.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.012, caption, ha="center", va="bottom", fontsize=8.5, wrap=True)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1 - 0.3 / height))
    data = _png_bytes(fig)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=CONFIG, help="model config (default: %(default)s)")
    ap.add_argument("--weights", default=WEIGHTS, help="trained weights (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (full-size PhantomOptions, generator v6)")
    ap.add_argument("--ct", default=REAL_CT, help="real CT, NIfTI (default: the example CT)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images"), help="folder for the PNGs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.dicom import Volume, load_nifti
    from bmd_d2.errors import BMDError
    from bmd_d2.phantoms import PhantomOptions
    from bmd_d2.phantoms.dataset import generate_study

    try:
        cfg = get_bmd_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu"])
        st = generate_study(args.seed, PhantomOptions(preview=False, generator_version=6))
        studies = [(Volume(st.hu, np.asarray(st.affine, float)), "anchors_phantom.png",
                    f"Level anchors on phantom seed {args.seed} (synthetic, generator v6, {st.hu.shape[2]}² × "
                    f"{st.hu.shape[0]} slices)"),
                   (load_nifti(args.ct, dtype="auto"), "anchors_real_ct.png",
                    f"Level anchors on the real CT ({os.path.basename(args.ct)})")]
        for volume, name, title in studies:
            result, grid, ribs = measure(volume, cfg)
            if grid is None:
                raise BMDError(f"{name}: no mid-sagittal plane found (fallback plane): nothing to draw")
            path = os.path.join(args.out, name)
            size = draw(result, grid, ribs, title, path)
            lv = result.levels or {}
            logger.info("%s: %.0f kB; levels %s; levels_anchor %s, rib_pairs_in_view %s, flags %s", path,
                        size / 1e3, [v.level for v in result.vertebrae], lv.get("levels_anchor"),
                        lv.get("rib_pairs_in_view"), result.qc_flags)
            if size > MAX_PNG_BYTES:
                logger.warning("%s is %.0f kB (> %.0f kB)", path, size / 1e3, MAX_PNG_BYTES / 1e3)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
