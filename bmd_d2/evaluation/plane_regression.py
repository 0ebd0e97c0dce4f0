"""Regression check of the mid-sagittal plane search and the sagittal image, behind ``tools/plane_regression.py``.

:func:`measure_planes` records per study the plane (point, normal, method), the ``SagittalImage`` transform, the uint8
image, the HU and the plane search time; :func:`compare_planes` compares two such records: plane shift (distance of
the old point from the new plane, mm), angle between the normals, the largest transform difference and the image / HU
differences. A study fails when its plane moved by ``max_mm`` or more, turned by ``max_deg`` or more, changed its
method, or its image changed in more than ``max_pixels`` pixels by more than 2 grey levels.
"""
import glob
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plane_sources", "measure_planes", "compare_planes", "format_plane", "format_comparison"]


def plane_sources(studies_dir: str, root: str) -> Iterator[Tuple[str, str]]:
    """(name, path) of every study checked: ``studies_dir/*/dicom``, the example study and the real CTs (NIfTI and
    DICOM) of the repository ``root``."""
    for d in sorted(glob.glob(os.path.join(studies_dir, "*", "dicom"))):
        yield os.path.basename(os.path.dirname(d)), d
    for d in sorted(glob.glob(os.path.join(root, "datasets", "example", "studies", "*", "dicom"))):
        yield "example/" + os.path.basename(os.path.dirname(d)), d
    real = os.path.join(root, "tests", "data", "real")
    yield "real/example_ct.nii.gz", os.path.join(real, "totalseg_example_ct", "example_ct.nii.gz")
    yield "real/dicom", os.path.join(real, "totalseg_example_ct_dicom", "dicom")


def measure_planes(studies_dir: str, root: str, config_file: str = "") -> Iterator[Tuple[str, tuple, Dict[str, Any]]]:
    """Find the plane and make the sagittal image of every existing :func:`plane_sources` study.

    Args:
        studies_dir: folder of ``*/dicom`` studies.
        root: the repository (example study, real CTs).
        config_file: config whose ``INPUT.DICOM`` sagittal parameters are used (default: bmd_d2's defaults).

    Yields:
        (name, volume shape, record): the record holds ``point``, ``normal``, ``method``, ``transform``, ``image``,
        ``hu`` and ``plane_s`` (plane search seconds).
    """
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.datasets import params_from_cfg
    from bmd_d2.data.dicom import load_nifti, load_volume
    from bmd_d2.data.sagittal import find_midsagittal_plane, make_sagittal

    params = params_from_cfg(get_bmd_cfg(config_file) if config_file else get_bmd_cfg())
    for name, src in plane_sources(studies_dir, root):
        if not os.path.exists(src):
            continue
        vol = load_nifti(src) if src.endswith((".nii", ".nii.gz")) else load_volume(src)
        t = time.perf_counter()
        plane = find_midsagittal_plane(vol)
        dt = time.perf_counter() - t
        sag = make_sagittal(vol, plane=plane, **params)
        yield name, vol.data.shape, dict(point=plane.point, normal=plane.normal, method=plane.info.get("method"),
                                         transform=sag.transform, image=sag.image, hu=sag.hu, plane_s=dt)


def format_plane(name: str, shape: tuple, rec: Dict[str, Any]) -> str:
    """One line per measured study: name, volume shape, plane search time and method."""
    return f"{name:28s} {'×'.join(map(str, shape)):14s} plane {rec['plane_s']:.2f} s ({rec['method']})"


def compare_planes(ref: Dict[str, Dict], new: Dict[str, Dict], max_mm: float = 0.5, max_deg: float = 0.5,
                   max_pixels: int = 0) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Compare the records ``new`` with ``ref`` (name → :func:`measure_planes` record).

    Returns:
        (rows, summary): per study of ``ref`` a row, ``{"name", "missing": True}`` when ``new`` lacks it, else
        ``mm``, ``deg``, ``transform``, ``grey_max``, ``bad_pixels``, ``hu_max``, ``plane_s_ref``, ``plane_s_new``
        and ``fail``; the summary holds the worst ``mm`` / ``deg`` / ``grey``, the median plane search times
        ``plane_s_ref`` / ``plane_s_new`` and ``ok`` (no study missing or failing).
    """
    ok = True
    worst = dict(mm=0.0, deg=0.0, grey=0)
    rows: List[Dict[str, Any]] = []
    for name, a in ref.items():
        if name not in new:
            rows.append(dict(name=name, missing=True))
            ok = False
            continue
        b = new[name]
        mm = float(abs((a["point"] - b["point"]) @ b["normal"]))
        deg = float(np.degrees(np.arccos(np.clip(abs(a["normal"] @ b["normal"]), -1.0, 1.0))))
        dt = float(np.abs(a["transform"] - b["transform"]).max())
        if a["image"].shape == b["image"].shape:
            grey = np.abs(a["image"].astype(int) - b["image"].astype(int))
            bad, gmax, dhu = int((grey > 2).sum()), int(grey.max()), float(np.abs(a["hu"] - b["hu"]).max())
        else:
            bad, gmax, dhu = a["image"][..., 0].size, 255, float("inf")
        worst = dict(mm=max(worst["mm"], mm), deg=max(worst["deg"], deg), grey=max(worst["grey"], gmax))
        fail = mm >= max_mm or deg >= max_deg or bad > max_pixels or a["method"] != b["method"]
        ok &= not fail
        rows.append(dict(name=name, missing=False, mm=mm, deg=deg, transform=dt, grey_max=gmax, bad_pixels=bad,
                         hu_max=dhu, plane_s_ref=a["plane_s"], plane_s_new=b["plane_s"], fail=fail))
    t0, t1 = (np.median([d["plane_s"] for d in x.values()]) for x in (ref, new))
    return rows, dict(worst, plane_s_ref=t0, plane_s_new=t1, ok=ok)


def format_comparison(rows: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    """The comparison (what ``tools/plane_regression.py compare`` prints): a line per study and the worst figures,
    without the final newline."""
    lines = []
    for r in rows:
        if r["missing"]:
            lines.append(f"{r['name']:28s} MISSING")
            continue
        lines.append(f"{r['name']:28s} shift {r['mm']:.1e} mm  angle {r['deg']:.1e}°  transform {r['transform']:.1e}  "
                     f"image max {r['grey_max']} grey (>2: {r['bad_pixels']} px)  HU max {r['hu_max']:.1e}  "
                     f"plane {r['plane_s_ref']:.2f} → {r['plane_s_new']:.2f} s" + ("  FAIL" if r["fail"] else ""))
    s = summary
    lines.append(f"worst: shift {s['mm']:.2e} mm, angle {s['deg']:.2e}°, image {s['grey']} grey levels; "
                 f"plane search median {s['plane_s_ref']:.2f} → {s['plane_s_new']:.2f} s; "
                 f"{'OK' if s['ok'] else 'FAILED'}")
    return "\n".join(lines)
