"""Crash-safe batch: a real ``bmd-measure`` batch process killed with SIGKILL at several moments and run again ends
with the same batch files and the same per-study files as one uninterrupted run, and no study is ever counted as done
before all its requested outputs were written (issue 16, point 5).

The shipped default model measures tiny phantoms (one model pass: the test-time passes off, for speed) with every
optional output requested (masks + DICOM SEG/SR/SC); one study is a corrupt file and fails in every run.
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest

from bmd_d2.phantoms import PhantomOptions, generate_study, write_study
from bmd_d2 import reports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "bmd_default.yaml")
N_GOOD = 4
OPTIONAL_FILES = {"masks": "masks.nii.gz", "dicom_seg": "segmentation.dcm", "dicom_sr": "report_sr.dcm",
                  "dicom_sc": "overlay_sc.dcm"}
# elements that record when an object was made, not what it says
_WHEN = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime",
         "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "ContributionDateTime"}


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash_in")
    for seed in range(N_GOOD):
        st = generate_study(20 + seed, PhantomOptions.tiny(metal=False))
        write_study(st, root / "studies" / f"s{seed}", preview=False)
    bad = root / "studies" / "s9_corrupt"
    bad.mkdir(parents=True)
    (bad / "IM1.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    return root


def _cmd(src, out):
    return [sys.executable, "-m", "bmd_d2.cli.measure", str(src), "--config-file", CFG, "-o", str(out), "-q",
            "--workers", "1", "--masks", "--dicom-outputs", "MEASURE.TTA_SHIFTS", "[]", "MEASURE.TTA_SIZES", "[]"]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


def _study_dirs(out):
    return sorted(p for p in os.listdir(out) if os.path.isdir(os.path.join(out, p))) if os.path.isdir(out) else []


def _pending(out):
    """A study whose result.json exists but whose optional outputs are still being written."""
    for d in _study_dirs(out):
        r = reports.read_result(os.path.join(out, d))
        if r and not (r.get("outputs") or {}).get("complete"):
            return True
    return False


def _temp_file(out):
    return any(".tmp" in f for d in _study_dirs(out) for f in os.listdir(os.path.join(out, d)))


def _finished(out, n):
    return sum(reports.is_finished(os.path.join(out, d)) for d in _study_dirs(out)) >= n


def _check_no_false_done(out):
    """Every study counted as finished has each requested output written, or recorded as failed/skipped."""
    done = []
    for d in _study_dirs(out):
        sdir = os.path.join(out, d)
        if not reports.is_finished(sdir, list(OPTIONAL_FILES)):
            continue
        r = reports.read_result(sdir)
        outs = r["outputs"]
        for name, fname in OPTIONAL_FILES.items():
            path = os.path.join(sdir, fname)
            if name in outs["failed"] or name in outs["skipped"]:
                continue
            if name.startswith("dicom_") and ("dicom" in outs["failed"]):
                continue
            if name == "dicom_seg" and fname not in outs["written"]:  # a SEG needs a measured vertebra
                continue
            assert os.path.isfile(path), (d, fname)
            if fname.endswith(".dcm"):
                pydicom.dcmread(path)
            else:
                nib.load(path).get_fdata()
        for fname in (reports.VERTEBRAE_CSV, reports.OVERLAY_PNG):
            assert os.path.isfile(os.path.join(sdir, fname)), (d, fname)
        done.append(d)
    return done


def _kill_when(cmd, condition, out, limit_s):
    """Start ``cmd``; SIGKILL it as soon as ``condition(out, elapsed)`` holds. Returns (killed, elapsed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    killed = False
    while proc.poll() is None and time.time() - t0 < limit_s:
        if condition(str(out), time.time() - t0):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        killed = True
    proc.wait()
    return killed, time.time() - t0


def _dicom_content(path):
    ds = pydicom.dcmread(path)

    def strip(d):
        for kw in _WHEN:
            if kw in d:
                delattr(d, kw)
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    strip(item)

    strip(ds)
    return ds.to_json_dict()


def _same_study_files(a, b):
    fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert fa == fb
    for f in fa:
        pa, pb = os.path.join(a, f), os.path.join(b, f)
        if f == reports.RESULT_JSON:
            assert json.load(open(pa)) == json.load(open(pb)), pa
        elif f.endswith(".dcm"):
            assert _dicom_content(pa) == _dicom_content(pb), pa
        elif f.endswith(".nii.gz"):
            ia, ib = nib.load(pa), nib.load(pb)
            assert np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj)) and np.allclose(ia.affine, ib.affine)
        else:
            assert open(pa, "rb").read() == open(pb, "rb").read(), pa


def test_batch_killed_at_several_moments_resumes_to_the_same_result(batch_input, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(batch_input, ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr  # the corrupt study fails, the others are measured
    assert "Traceback" not in r.stderr
    ref_summary = json.load(open(ref / "summary.json"))
    assert ref_summary["measured"] == N_GOOD and ref_summary["failed"] == 1
    run_s = ref_summary["this_run"]["seconds"]

    out = tmp_path / "out"
    rng = random.Random(16)
    moments = [
        ("while starting", lambda o, t, d=rng.uniform(0.5, 3.0): t > d),
        ("during an atomic write", lambda o, t: _temp_file(o)),
        ("result.json written, optional outputs pending", lambda o, t: _pending(o)),
        ("between studies", lambda o, t: _finished(o, N_GOOD - 1)),
        ("at a random moment", lambda o, t, d=rng.uniform(2.0, 8.0 + run_s): t > d),
    ]
    killed = []
    for name, cond in moments:
        before = set(_check_no_false_done(str(out))) if out.exists() else set()
        k, elapsed = _kill_when(_cmd(batch_input, out), cond, out, limit_s=300)
        killed.append((name, k, round(elapsed, 2)))
        after = set(_check_no_false_done(str(out)))
        assert before <= after, name  # a finished study stays finished
    assert sum(k for _, k, _ in killed) >= 4, killed  # the process really was killed at (nearly) every moment

    r = subprocess.run(_cmd(batch_input, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    summary = json.load(open(out / "summary.json"))
    this_run = summary.pop("this_run")
    ref_summary.pop("this_run")
    assert summary == ref_summary
    assert this_run["measured"] + this_run["skipped"] == N_GOOD
    for f in ("studies.csv", "all_vertebrae.csv", "failures.csv"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    fails = list(csv.DictReader(open(out / "failures.csv")))
    assert [x["study_id"] for x in fails] == ["s9_corrupt"] and "IM1.dcm" in fails[0]["reason"]
    assert _study_dirs(str(out)) == _study_dirs(str(ref))
    for d in _study_dirs(str(ref)):
        _same_study_files(ref / d, out / d)
    assert sorted(_check_no_false_done(str(out))) == [f"s{i}" for i in range(N_GOOD)]
