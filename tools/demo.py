#!/usr/bin/env python
"""The main job: measure the bundled example CT with the shipped default model.

1. The example study (``datasets/example/``) is generated on first use and again after a phantom generator change
   (``generator_version`` in its phantom.json), deterministically (seed below): a 512² CT
   DICOM series of a lumbar spine whose true BMD per vertebra is known, plus the scanner's calibration file (what a
   QCT calibration phantom scanned with the patient gives).
2. ``bmd-measure`` runs on it with ``configs/bmd_default.yaml`` (``models/bmd_rcnn_MFEFPN_R18_cpu.pth``) and writes
   ``output/example/<study>/{result.json, vertebrae.csv, overlay.png}``.
3. The measured values are printed beside the truth.

    python tools/demo.py [--output DIR] [--config-file FILE] [--regenerate]
"""
import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DIR = os.path.join(ROOT, "datasets", "example")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "bmd_default.yaml")


def make_example(out_dir: str, regenerate: bool = False) -> str:
    """Write the example study once; return its DICOM folder."""
    from bmd_d2.phantoms import EXAMPLE_SEED, GENERATOR_VERSION, example_options, generate_study, write_study

    study_dir = os.path.join(out_dir, "studies", "example_0001")
    dicom_dir = os.path.join(study_dir, "dicom")
    if os.path.isdir(dicom_dir) and os.path.isfile(os.path.join(out_dir, "calibration.json")) and not regenerate:
        try:  # an example written by an older phantom generator is rewritten (same seed, current anatomy)
            with open(os.path.join(study_dir, "phantom.json")) as f:
                current = json.load(f).get("generator_version") == GENERATOR_VERSION
        except (OSError, ValueError):
            current = False
        if current:
            return dicom_dir
    shutil.rmtree(study_dir, ignore_errors=True)  # no slice of an older example may stay beside the new one
    t0 = time.time()
    st = generate_study(EXAMPLE_SEED, example_options(), "example_0001")
    write_study(st, study_dir)
    with open(os.path.join(out_dir, "truth.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "bmd_mg_cm3", "qct_bmd_mg_cm3", "trabecular_hu"])
        for t in st.truth:  # qct_bmd_mg_cm3: what an ideal phantom QCT reads (generator v5; the measurement's target)
            qct = t.get("qct_bmd_mg_cm3")
            w.writerow([t["level"], f"{t['bmd_mg_cm3']:.1f}", "" if qct is None else f"{qct:.1f}",
                        f"{t['trabecular_hu']:.1f}"])
    cal = {"slope": st.params["calib_b"], "intercept": st.params["calib_a"], "kvp": st.params["kvp"],
           "description": "example scanner: HU = intercept + slope * BMD (mg/cm3), as a QCT phantom would give"}
    with open(os.path.join(out_dir, "calibration.json"), "w") as f:
        json.dump(cal, f, indent=2)
    print(f"generated the example CT in {time.time() - t0:.1f} s: {dicom_dir} ({st.hu.shape[0]} slices)")
    return dicom_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=os.path.join(ROOT, "output", "example"))
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--regenerate", action="store_true", help="rewrite the example study")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import bmd_d2  # noqa: F401
    from bmd_d2 import BMDError
    from bmd_d2.cli.measure import main as measure

    os.chdir(ROOT)  # the default config names its weights relative to the repository
    try:
        dicom_dir = make_example(EXAMPLE_DIR, args.regenerate)
    except BMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"measuring {os.path.relpath(dicom_dir, ROOT)} with {os.path.relpath(args.config_file, ROOT)} ...")
    t0 = time.time()
    rc = measure([dicom_dir, "--single", "--config-file", args.config_file, "-o", args.output,
                  "--calibration", os.path.join(EXAMPLE_DIR, "calibration.json"), "-q"])
    if rc not in (0, 3):  # 3: measured, an optional output missing (none is requested here)
        return rc
    print(f"measured in {time.time() - t0:.1f} s (model load included)")
    with open(os.path.join(args.output, "example_0001", "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(EXAMPLE_DIR, "truth.csv")) as f:
        truth = {r["level"]: r for r in csv.DictReader(f)}
    print("\nmeasured vs truth (mg/cm³; the example is a phantom, so the truth is known):")
    # the truth a QCT measurement targets: the QCT reading of the trabecular bone (marrow fat included) where the
    # example records it (an example written before it was recorded: the mineral density)
    if any(t.get("qct_bmd_mg_cm3") for t in truth.values()):
        print("(true = what an ideal phantom QCT reads, qct_bmd_mg_cm3; the mineral density itself is in truth.csv)")
    print(f"{'level':6} {'true':>7} {'learned':>8} {'classic':>8} {'err(L)':>7} {'err(C)':>7}")
    found = {v.get("level"): v for v in result["vertebrae"] if v.get("level")}

    def num(x):
        return f"{x:8.1f}" if isinstance(x, (int, float)) else f"{'-':>8}"

    def err(x, tv):
        return f"{x - tv:+7.1f}" if isinstance(x, (int, float)) else f"{'-':>7}"

    for level, t in truth.items():
        tv = float(t.get("qct_bmd_mg_cm3") or t["bmd_mg_cm3"])
        v = found.get(level)
        if v is None:
            print(f"{level:6} {tv:7.1f}  not detected")
            continue
        cb = v.get("classical_bmd_3d") if v.get("classical_bmd_3d") is not None else v.get("classical_bmd")
        print(f"{level:6} {tv:7.1f} {num(v.get('learned_bmd'))} {num(cb)} {err(v.get('learned_bmd'), tv)} "
              f"{err(cb, tv)}")
    extra = [v for v in result["vertebrae"] if v.get("level") not in truth]
    if extra:
        print(f"{len(extra)} detection(s) without a level in the truth table (see the report's flags)")
    print(f"\nreports: {os.path.join(args.output, 'example_0001')}/"
          "{result.json, vertebrae.csv, overlay.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
