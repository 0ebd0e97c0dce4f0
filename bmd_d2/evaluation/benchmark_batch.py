"""Cohort-scale batch benchmark (``tools/benchmark_batch.py``): a cohort of phantom studies with a share of corrupt
ones, measured by ``bmd-measure --batch`` with 1 and 2 workers (studies/hour), and the fault run: a worker killed
(SIGKILL) and the driver killed mid-batch, then resumed, with every good study measured and every bad one reported.

The cohort is written once under ``<root>/studies/<id>/dicom`` (a rerun reuses what is there: ``cohort.json`` lists
the studies, their kind and, for the corrupt ones, what was broken). Corruptions (each must fail with a reason, never
with a number): ``not_dicom`` (every file replaced by text), ``truncated`` (one slice's pixel data cut short),
``non_ct`` (Modality MR), ``empty`` (a folder without files), ``mixed_size`` (one slice with other Rows/Columns).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

CORRUPTIONS = ("not_dicom", "truncated", "non_ct", "empty", "mixed_size")


def _dicom_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith("."))


def corrupt_study(folder: str, kind: str, rng: np.random.Generator) -> str:
    """Break the DICOM series in ``folder`` in the way ``kind`` names; returns a one-line description."""
    import pydicom

    files = _dicom_files(folder)
    if kind == "not_dicom":
        for f in files:
            with open(f, "w", encoding="utf-8") as fh:
                fh.write("this is not a DICOM file\n")
        return f"{len(files)} files replaced by text"
    if kind == "empty":
        for f in files:
            os.remove(f)
        return "all files removed"
    victim = files[int(rng.integers(len(files)))]
    if kind == "truncated":
        size = os.path.getsize(victim)
        with open(victim, "r+b") as fh:
            fh.truncate(size - (size - 1024) // 2)  # header kept, half of the pixel data gone
        return f"{os.path.basename(victim)} truncated to half its pixel data"
    if kind == "non_ct":
        for f in files:
            ds = pydicom.dcmread(f)
            ds.Modality = "MR"
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.save_as(f)
        return "Modality MR in every file"
    if kind == "mixed_size":
        ds = pydicom.dcmread(victim)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()  # now explicit VR little endian
        arr = np.ascontiguousarray(ds.pixel_array[: ds.Rows // 2])
        ds.Rows = arr.shape[0]
        ds.PixelData = arr.tobytes()
        ds.save_as(victim)
        return f"{os.path.basename(victim)} has half the Rows of the others"
    raise ValueError(f"unknown corruption {kind!r}")


def make_cohort(root: str, n: int, corrupt_fraction: float, seed: int, phantom: str = "full") -> List[Dict]:
    """Write (or reuse) ``n`` phantom studies under ``<root>/studies``, ``round(n · corrupt_fraction)`` of them
    corrupt (spread evenly, kinds in turn); returns the ``cohort.json`` records (study_id, kind, detail, truth)."""
    from bmd_d2.phantoms import study_seed

    from .benchmark_speed import phantom_options, write_phantoms

    index = os.path.join(root, "cohort.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            records = json.load(f)
        if len(records) == n:
            return records
    n_bad = int(round(n * corrupt_fraction))
    bad = set(np.linspace(0, n - 1, n_bad).round().astype(int).tolist()) if n_bad else set()
    rng = np.random.default_rng(seed)
    records = []
    jobs = []
    for i in range(n):
        sid = f"cohort_{i:04d}"
        folder = os.path.join(root, "studies", sid)
        done = os.path.join(folder, ".written")
        jobs.append((study_seed(seed, i), phantom_options(phantom), sid, folder, False, done))
    todo = [j for j in jobs if not os.path.exists(j[5])]
    for k in range(0, len(todo), 10):  # in chunks: an interrupted generation keeps what it wrote
        chunk = todo[k:k + 10]
        for j in chunk:
            shutil.rmtree(j[3], ignore_errors=True)
        write_phantoms([j[:5] for j in chunk])
        for j in chunk:
            open(j[5], "w").close()
    kinds = iter(CORRUPTIONS * (n_bad // len(CORRUPTIONS) + 1))
    for i, (_, _, sid, folder, _, _) in enumerate(jobs):
        kind = next(kinds) if i in bad else "good"
        detail = corrupt_study(os.path.join(folder, "dicom"), kind, rng) if kind != "good" else ""
        records.append({"study_id": sid, "kind": kind, "detail": detail})
    with open(index, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return records


def _measure_cmd(args, input_dir: str, out: str, workers: int, extra: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, "-m", "bmd_d2.cli.measure", input_dir, "--batch", "-o", out, "--config-file",
           args.config_file, "--workers", str(workers), "--no-overlay", *extra]
    if args.weights:
        cmd += ["--weights", args.weights]
    return cmd


def _finished(out: str) -> int:
    from bmd_d2 import reports

    n = 0
    for e in os.scandir(out) if os.path.isdir(out) else ():
        if e.is_dir() and reports.is_finished_result(reports.read_result(e.path), reports.requested_outputs()):
            n += 1
    return n


def _ray_worker_pids() -> List[int]:
    """PIDs of this machine's Ray actor processes of the batch (process title ``ray::StudyWorker...``)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if cmd.startswith(b"ray::StudyWorker"):
            pids.append(int(d))
    return sorted(pids)


def throughput(args, records: List[Dict], root: str, workers: int, n: int) -> Dict[str, Any]:
    """Measure the first ``n`` good studies with ``workers`` workers (1 = in-process, no Ray); studies/hour from
    the wall time of the whole command (start-up included) and from the batch's own time."""
    sub = os.path.join(root, f"subset_{n}")
    if not os.path.isdir(sub):
        os.makedirs(sub)
        for r in [r for r in records if r["kind"] == "good"][:n]:
            os.symlink(os.path.join(root, "studies", r["study_id"]), os.path.join(sub, r["study_id"]))
    out = os.path.join(root, f"out_tp_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(_measure_cmd(args, sub, out, workers, ["-q"]), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    batch_s = float(summary["this_run"]["seconds"])
    shutil.rmtree(out, ignore_errors=True)
    return {"workers": workers, "engine": "in-process" if workers == 1 else "ray", "studies": n,
            "exit_code": proc.returncode, "measured": summary["measured"], "wall_s": round(wall, 1),
            "batch_s": round(batch_s, 1), "studies_per_hour": round(3600.0 * n / wall),
            "studies_per_hour_batch": round(3600.0 * n / batch_s) if batch_s else None}


def fault_run(args, records: List[Dict], root: str, workers: int, kill_worker_at: int,
              kill_driver_at: int) -> Dict[str, Any]:
    """Measure the whole cohort on local Ray; SIGKILL one worker once ``kill_worker_at`` studies are finished and
    the driver once ``kill_driver_at`` are, then run the same command again (resume) to the end."""
    out = os.path.join(root, "out_fault")
    shutil.rmtree(out, ignore_errors=True)
    cmd = _measure_cmd(args, os.path.join(root, "studies"), out, workers, ["-q"])
    events: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_worker = killed_driver = False
    while proc.poll() is None:
        time.sleep(0.5)
        done = _finished(out)
        if not killed_worker and done >= kill_worker_at:
            pids = _ray_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed_worker = True
                events.append({"event": "worker SIGKILL", "pid": pids[0], "finished": done,
                               "t_s": round(time.perf_counter() - t0, 1)})
        if killed_worker and done >= kill_driver_at:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
            proc.wait()
            killed_driver = True
            events.append({"event": "driver SIGKILL", "finished": done, "t_s": round(time.perf_counter() - t0, 1)})
            break
    first_rc = proc.returncode
    stderr_tail = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
    time.sleep(2.0)  # let the killed session's processes go
    t1 = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True)
    events.append({"event": "resume finished", "exit_code": second.returncode,
                   "t_s": round(time.perf_counter() - t0, 1), "resume_s": round(time.perf_counter() - t1, 1)})
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    fails = {f["study_id"]: f["reason"] for f in summary["failures"]}
    good = [r["study_id"] for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    from bmd_d2 import reports

    measured_good = sum(reports.is_finished_result(reports.read_result(os.path.join(out, s)),
                                                   reports.requested_outputs()) for s in good)
    return {"studies": len(records), "good": len(good), "corrupt": len(bad), "workers": workers,
            "killed_worker": killed_worker, "killed_driver": killed_driver, "first_exit_code": first_rc,
            "events": events, "good_measured": measured_good, "corrupt_reported": sum(r["study_id"] in fails
                                                                                      for r in bad),
            "good_failed": sorted(s for s in good if s in fails),
            "corrupt_reasons": {r["study_id"]: f"{r['kind']}: {fails.get(r['study_id'], 'NOT REPORTED')}"
                                for r in bad},
            "summary": {k: summary[k] for k in ("studies", "measured", "failed")},
            "this_run": summary["this_run"], "first_run_stderr_tail": stderr_tail if not killed_driver else "",
            "ok": measured_good == len(good) and all(r["study_id"] in fails for r in bad)}


def run(args) -> Dict[str, Any]:
    """All sections of the benchmark (see the module docstring); the report dict."""
    from .benchmark_speed import describe_machine

    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    records = make_cohort(root, args.studies, args.corrupt_fraction, args.seed, args.phantom)
    rep: Dict[str, Any] = {"benchmark": "batch", "machine": describe_machine("cpu"), "config_file": args.config_file,
                           "weights": args.weights, "phantom": args.phantom, "cohort": {
                               "studies": len(records), "corrupt": sum(r["kind"] != "good" for r in records),
                               "kinds": {k: sum(r["kind"] == k for r in records) for k in ("good",) + CORRUPTIONS}},
                           "generate_s": round(time.perf_counter() - t0, 1)}
    rep["throughput"] = [throughput(args, records, root, w, args.throughput_studies) for w in args.workers]
    if not args.skip_fault:
        rep["fault"] = fault_run(args, records, root, max(args.workers), args.kill_worker_at, args.kill_driver_at)
    rep["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return rep


def format_report(rep: Dict[str, Any]) -> str:
    lines = [f"bmd_d2 batch benchmark — {rep['machine'].get('cpu', '')} | cohort {rep['cohort']}"]
    lines.append("\n| workers | engine | studies | wall s | studies/hour (wall) | studies/hour (batch) | exit |")
    lines.append("|--:|:--|--:|--:|--:|--:|--:|")
    for t in rep["throughput"]:
        lines.append(f"| {t['workers']} | {t['engine']} | {t['studies']} | {t['wall_s']} | {t['studies_per_hour']} "
                     f"| {t['studies_per_hour_batch']} | {t['exit_code']} |")
    f: Optional[Dict[str, Any]] = rep.get("fault")
    if f:
        lines.append(f"\nFault run: {f['studies']} studies ({f['corrupt']} corrupt), {f['workers']} workers on "
                     f"local Ray")
        for e in f["events"]:
            lines.append(f"  {e}")
        lines.append(f"  good measured {f['good_measured']}/{f['good']}, corrupt reported "
                     f"{f['corrupt_reported']}/{f['corrupt']} -> {'OK' if f['ok'] else 'FAILED'}")
        for sid, why in sorted(f["corrupt_reasons"].items()):
            lines.append(f"    {sid}: {why}")
    return "\n".join(lines)
