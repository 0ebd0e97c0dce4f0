"""Sagittal QA panels of generated phantom studies, behind ``tools/make_sagittal_pngs.py``.

Each panel shows, side by side: the model's 3-channel image as RGB (grey where the channels agree, colour fringes where
the neighbouring planes differ), and the mid-plane channel in grey with the vertebral-body labels sampled into it
(nearest neighbour through the exact transform) outlined in colour, and the plane fit in the title bar.
"""
import logging
import os
import tempfile
from typing import Iterator, List, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["render_panel", "write_sagittal_pngs"]

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]


def render_panel(sag, labels2d: np.ndarray, title: str) -> np.ndarray:
    """The panel of one sagittal image.

    Args:
        sag: ``SagittalImage`` (``image`` uint8 (H, W, 3)).
        labels2d: int (H, W) body labels in the sagittal image (0 = background).
        title: text of the title bar.

    Returns:
        uint8 RGB ``(22 + H, 2W + 8, 3)``.
    """
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


def write_sagittal_pngs(out: str, n: int, seed: int = 0, full: bool = False) -> Iterator[Tuple[str, List[int]]]:
    """Generate ``n`` phantom studies (seeds from ``seed``) in a temporary folder and write one panel PNG each,
    ``out/sagittal_<study id>.png``.

    Args:
        out: output folder (created).
        n: number of studies.
        seed: base seed of the generated dataset.
        full: full-size 512² studies (sagittal image 512²) instead of the generator's tiny option (256²).

    Yields:
        (PNG path, label values present in the sagittal image) per study, after its file is written.

    Raises:
        BMDError: a study that cannot be loaded.
    """
    import cv2

    from bmd_d2.data.dicom import load_nifti, load_series
    from bmd_d2.data.sagittal import make_sagittal, sample_volume_to_sagittal
    from bmd_d2.phantoms import PhantomOptions, generate_dataset

    os.makedirs(out, exist_ok=True)
    opts = PhantomOptions() if full else PhantomOptions.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        ids = generate_dataset(tmp, n, seed=seed, options=opts, progress=False)
        for sid in ids:
            d = os.path.join(tmp, "studies", sid)
            vol = load_series(os.path.join(d, "dicom"))
            sag = make_sagittal(vol, size=512 if full else 256)
            lab = load_nifti(os.path.join(d, "labels.nii.gz"), dtype=np.int16)
            L = sample_volume_to_sagittal(sag, lab)[1]
            p = sag.info["plane"]
            title = (f"{sid}: theta {p.get('theta_deg', 0):.1f} deg, coronal tilt {p.get('coronal_tilt_deg', 0):.1f} "
                     f"deg, {sag.spacing:.2f} mm/px, cut={sag.info['cut']}")
            path = os.path.join(out, f"sagittal_{sid}.png")
            cv2.imwrite(path, render_panel(sag, L, title)[..., ::-1])
            yield path, sorted(set(np.unique(L).tolist()) - {0})
