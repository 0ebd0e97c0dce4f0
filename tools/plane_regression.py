#!/usr/bin/env python
"""Check that a change to the sagittal code keeps the mid-sagittal planes and images: record them, change, compare.

    python tools/plane_regression.py record /tmp/planes_before.pkl       # before the change
    python tools/plane_regression.py compare /tmp/planes_before.pkl      # after: exit 1 if a plane moved

Studies: every ``DIR/*/dicom`` of ``--studies-dir`` (default ``datasets/bmd_phantoms_val/studies``), the example
study and the real CTs of ``tests/data/real`` (NIfTI and DICOM). Per study the plane (point, normal), the
``SagittalImage`` transform, the uint8 image and the HU are stored with the sagittal parameters of ``--config-file``.
``compare`` prints per study the plane shift (distance of the old point from the new plane, mm), the angle between
the normals, the largest transform difference and the image / HU differences; it fails when any plane moved by
``--max-mm`` (0.5) or more, turned by ``--max-deg`` (0.5) or more, or an image changed in more than
``--max-pixels`` (0) pixels by more than 2 grey levels. The plane search times are printed too (same machine load
needed to compare them).
"""
import argparse
import glob
import logging
import os
import pickle
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sources(studies_dir):
    for d in sorted(glob.glob(os.path.join(studies_dir, "*", "dicom"))):
        yield os.path.basename(os.path.dirname(d)), d
    for d in sorted(glob.glob(os.path.join(ROOT, "datasets", "example", "studies", "*", "dicom"))):
        yield "example/" + os.path.basename(os.path.dirname(d)), d
    real = os.path.join(ROOT, "tests", "data", "real")
    yield "real/example_ct.nii.gz", os.path.join(real, "totalseg_example_ct", "example_ct.nii.gz")
    yield "real/dicom", os.path.join(real, "totalseg_example_ct_dicom", "dicom")


def measure(args):
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.datasets import params_from_cfg
    from bmd_d2.data.dicom import load_nifti, load_volume
    from bmd_d2.data.sagittal import find_midsagittal_plane, make_sagittal

    params = params_from_cfg(get_bmd_cfg(args.config_file) if args.config_file else get_bmd_cfg())
    out = {}
    for name, src in sources(args.studies_dir):
        if not os.path.exists(src):
            continue
        vol = load_nifti(src) if src.endswith((".nii", ".nii.gz")) else load_volume(src)
        t = time.perf_counter()
        plane = find_midsagittal_plane(vol)
        dt = time.perf_counter() - t
        sag = make_sagittal(vol, plane=plane, **params)
        out[name] = dict(point=plane.point, normal=plane.normal, method=plane.info.get("method"),
                         transform=sag.transform, image=sag.image, hu=sag.hu, plane_s=dt)
        print(f"{name:28s} {'×'.join(map(str, vol.data.shape)):14s} plane {dt:.2f} s ({out[name]['method']})",
              flush=True)
    return out


def compare(ref, new, args) -> bool:
    ok = True
    worst = dict(mm=0.0, deg=0.0, grey=0)
    for name, a in ref.items():
        if name not in new:
            print(f"{name:28s} MISSING")
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
        fail = mm >= args.max_mm or deg >= args.max_deg or bad > args.max_pixels or a["method"] != b["method"]
        ok &= not fail
        print(f"{name:28s} shift {mm:.1e} mm  angle {deg:.1e}°  transform {dt:.1e}  image max {gmax} grey "
              f"(>2: {bad} px)  HU max {dhu:.1e}  plane {a['plane_s']:.2f} → {b['plane_s']:.2f} s"
              + ("  FAIL" if fail else ""))
    t0, t1 = (np.median([d["plane_s"] for d in x.values()]) for x in (ref, new))
    print(f"worst: shift {worst['mm']:.2e} mm, angle {worst['deg']:.2e}°, image {worst['grey']} grey levels; "
          f"plane search median {t0:.2f} → {t1:.2f} s; {'OK' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("file", help="pickle written by record, read by compare")
    ap.add_argument("--studies-dir", default=os.path.join(ROOT, "datasets", "bmd_phantoms_val", "studies"))
    ap.add_argument("--config-file", default="", help="config whose INPUT.DICOM sagittal parameters are used")
    ap.add_argument("--max-mm", type=float, default=0.5)
    ap.add_argument("--max-deg", type=float, default=0.5)
    ap.add_argument("--max-pixels", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    res = measure(args)
    if args.mode == "record":
        with open(args.file, "wb") as f:
            pickle.dump(res, f)
        print(f"wrote {args.file} ({len(res)} studies)")
        return 0
    with open(args.file, "rb") as f:
        ref = pickle.load(f)
    return 0 if compare(ref, res, args) else 1


if __name__ == "__main__":
    sys.exit(main())
