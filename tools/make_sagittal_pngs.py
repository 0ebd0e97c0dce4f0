#!/usr/bin/env python
"""Write a few sagittal PNGs (3-slice image + label outlines + found plane) from generated phantom studies.

Each PNG shows, side by side: the model's 3-channel image as RGB (grey where the channels agree, colour fringes where
the neighbouring planes differ), and the mid-plane channel in grey with the vertebral-body labels sampled into it
(nearest neighbour through the exact transform) outlined in colour, and the plane fit in the title bar.

Usage: ``python tools/make_sagittal_pngs.py --out docs/images --n 3 --seed 0 [--full]``
(``--full`` renders full-size 512² studies; the default is the phantom generator's tiny option).
"""
import argparse
import logging
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
logger = logging.getLogger("make_sagittal_pngs")

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]


def render(sag, labels2d, title):
    """(H, 2W + 8, 3) uint8 RGB panel."""
    import cv2

    left = sag.image.copy()
    right = np.repeat(sag.image[..., 1:2], 3, axis=2).copy()
    for v in sorted(set(np.unique(labels2d).tolist()) - {0}):
        m = (labels2d == v).astype(np.uint8)
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(right, cs, -1, _COLOURS[(v - 1) % len(_COLOURS)], 1)
    panel = np.concatenate([left, np.zeros((left.shape[0], 8, 3), np.uint8), right], axis=1)
    bar = np.zeros((22, panel.shape[1], 3), np.uint8)
    cv2.putText(bar, title, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full-size studies (slower)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import cv2

    from bmd_d2.data.dicom import load_nifti, load_series
    from bmd_d2.data.phantom import PhantomOptions, generate_dataset
    from bmd_d2.data.sagittal import make_sagittal, sample_volume_to_sagittal
    from bmd_d2.errors import BMDError

    os.makedirs(args.out, exist_ok=True)
    opts = PhantomOptions() if args.full else PhantomOptions.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        ids = generate_dataset(tmp, args.n, seed=args.seed, options=opts, progress=False)
        for sid in ids:
            d = os.path.join(tmp, "studies", sid)
            try:
                vol = load_series(os.path.join(d, "dicom"))
                sag = make_sagittal(vol, size=512 if args.full else 256)
                lab = load_nifti(os.path.join(d, "labels.nii.gz"), dtype=np.int16)
            except BMDError as ex:
                logger.error("error: %s", ex)
                return 2
            L = sample_volume_to_sagittal(sag, lab)[1]
            p = sag.info["plane"]
            title = (f"{sid}: theta {p.get('theta_deg', 0):.1f} deg, coronal tilt {p.get('coronal_tilt_deg', 0):.1f} "
                     f"deg, {sag.spacing:.2f} mm/px, cut={sag.info['cut']}")
            out = os.path.join(args.out, f"sagittal_{sid}.png")
            cv2.imwrite(out, render(sag, L, title)[..., ::-1])
            logger.info("%s (levels in plane: %s)", out, sorted(set(np.unique(L).tolist()) - {0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
