"""The Ray batch engine (bmd_d2.engine.ray_batch, issue 21): a two-node Ray cluster on this machine measures the same
results as the in-process path, a worker killed (SIGKILL), timed out or crashing on every try costs only retries or
that one study, a driver killed mid-batch resumes to the uninterrupted run's files, and manifests are parsed strictly.

The shipped model (test-time passes off, for speed) on tiny phantoms; one Ray cluster (two raylets, 1 CPU each:
``ray.cluster_utils.Cluster``) is shared by the module, whose temporary folder (RAY_TMPDIR) is removed at the end.
"""
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from _dicom_fixtures import write_series
from bmd_d2 import BMDError, reports
from bmd_d2.cli.measure import main
from bmd_d2.engine.batch import INT_COLUMNS, FLOAT_COLUMNS, find_studies, read_manifest
from bmd_d2.engine.ray_batch import CRASH_ENV, PAUSE_ENV, StudyWorker, crash_cause
from bmd_d2.phantoms import PhantomOptions, generate_study, write_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "bmd_default.yaml")
GOOD = ["s0", "s1", "s2", "s3"]
BAD = ["s8_mr", "s9_corrupt"]
FAST = ["MEASURE.TTA_SHIFTS", "[]", "MEASURE.TTA_SIZES", "[]"]
TABLES = ("studies.csv", "all_vertebrae.csv", "failures.csv")


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two nodes (1 CPU each) on this machine, its files in a short temporary folder."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="bmdray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0", CUDA_VISIBLE_DEVICES="")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_in")
    for i, sid in enumerate(GOOD):
        st = generate_study(40 + i, PhantomOptions.tiny(metal=False))
        write_study(st, root / "studies" / sid, preview=False)
    write_series(str(root / "studies" / BAD[0]), np.zeros((12, 32, 32), np.float32), modality="MR",
                 private_block=False)
    (root / "studies" / BAD[1]).mkdir()
    (root / "studies" / BAD[1] / "IM1.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    return root


def _args(src, out, *extra):
    return [str(src), "--config-file", CFG, "-o", str(out), "-q"] + list(extra) + FAST


@pytest.fixture(scope="module")
def reference(cluster, inputs, tmp_path_factory):
    """One uninterrupted Ray batch on the two-node cluster: (output folder, exit code). s0 and s1 wait 3 s before
    they are measured, so that the worker started second always gets a study too (the results do not change)."""
    base = tmp_path_factory.mktemp("ray_ref")
    out = base / "out"
    os.environ[PAUSE_ENV] = f"s0:3:{base / 's0.pid'};s1:3:{base / 's1.pid'}"
    try:
        code = main(_args(inputs, out, "--ray-address", cluster.address))
    finally:
        del os.environ[PAUSE_ENV]
    return out, code


def _summary(out):
    return json.load(open(os.path.join(out, "summary.json")))


def _parquet_matches_csv(parquet_path, csv_path):
    import pyarrow.parquet as pq

    table = pq.read_table(str(parquet_path))
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    with open(csv_path, encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert table.column_names == header and table.num_rows == len(rows)
    for col in table.column_names:
        kind = str(table.schema.field(col).type)
        assert kind == ("int64" if col in INT_COLUMNS else "double" if col in FLOAT_COLUMNS else "string"), col
    for got, want in zip(table.to_pylist(), rows):
        for col, text in want.items():
            if text == "":
                assert got[col] is None, col
            elif col in INT_COLUMNS:
                assert got[col] == int(text), col
            elif col in FLOAT_COLUMNS:
                assert got[col] == float(text), col
            else:
                assert got[col] == text, col
    return table.num_rows


def test_two_node_batch_equals_the_in_process_path(reference, inputs, tmp_path, capsys):
    out, code = reference
    assert code == 1  # the MR series and the corrupt file fail, every CT study is measured
    s = _summary(out)
    assert (s["studies"], s["measured"], s["failed"]) == (6, 4, 2)
    run = s["this_run"]
    assert run["engine"] == "ray" and run["workers"] == 2 and run["worker_crashes"] == 0
    assert len(run["studies_per_node"]) == 2 and sum(run["studies_per_node"].values()) == 4  # both nodes measured
    fails = {f["study_id"]: f["reason"] for f in csv.DictReader(open(out / "failures.csv"))}
    assert set(fails) == set(BAD)
    assert "no CT image series (found: MR)" in fails["s8_mr"] and "IM1.dcm" in fails["s9_corrupt"]
    assert all("\n" not in r for r in fails.values())

    # the same studies in this process (--workers 1, one torch thread like each Ray worker): identical files
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = tmp_path / "local"
        assert main(_args(inputs, local, "--workers", "1")) == 1
    finally:
        torch.set_num_threads(threads)
    assert _summary(local)["this_run"]["engine"] == "in-process"
    for sid in GOOD:
        ray_result = json.load(open(out / sid / reports.RESULT_JSON))
        assert ray_result == json.load(open(local / sid / reports.RESULT_JSON)), sid
        assert ray_result["vertebrae"], sid  # the shipped model finds the phantom's vertebrae
    for f in TABLES:
        assert (out / f).read_bytes() == (local / f).read_bytes(), f
    assert _parquet_matches_csv(out / "studies.parquet", out / "studies.csv") == 6
    assert _parquet_matches_csv(out / "all_vertebrae.parquet", out / "all_vertebrae.csv") >= 4


def test_killed_timed_out_and_crashing_workers(reference, cluster, inputs, tmp_path, monkeypatch, caplog):
    """s1's worker is SIGKILLed and s2's exceeds --study-timeout: both retried and measured; s3 crashes its worker on
    every try: failed after the retry limit with Ray's cause; every other study measured."""
    ref_out, _ = reference
    pid_kill, pid_timeout = tmp_path / "s1.pid", tmp_path / "s2.pid"
    monkeypatch.setenv(PAUSE_ENV, f"s1:600:{pid_kill};s2:600:{pid_timeout}")
    monkeypatch.setenv(CRASH_ENV, "s3")
    killed = []

    def kill_when_paused():
        t0 = time.time()
        while not pid_kill.exists() and time.time() - t0 < 300:
            time.sleep(0.05)
        if pid_kill.exists():
            pid = int(pid_kill.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="bmd_d2"):
        code = main(_args(inputs, out, "--ray-address", cluster.address, "--retries", "1", "--study-timeout", "20"))
    killer.join(5)
    assert code == 1 and killed and pid_timeout.exists()
    s = _summary(out)
    assert (s["measured"], s["failed"], s["this_run"]["worker_crashes"]) == (3, 3, 4)
    fails = {f["study_id"]: f["reason"] for f in csv.DictReader(open(out / "failures.csv"))}
    assert set(fails) == {"s3"} | set(BAD)
    assert fails["s3"].startswith("worker crashed 2 times while measuring: The actor is dead"), fails["s3"]
    for sid in ("s0", "s1", "s2"):  # the retried ones too: the same numbers as the uninterrupted batch
        assert json.load(open(out / sid / reports.RESULT_JSON)) == json.load(open(ref_out / sid / reports.RESULT_JSON))
    assert "study s2: worker crashed (timeout: measuring took over 20 s (--study-timeout)); retrying" in caplog.text
    assert not (out / "s3").exists() or not reports.is_finished(str(out / "s3"))


def test_a_worker_that_cannot_load_the_model_is_one_error(cluster, inputs, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    code = main(_args(inputs, tmp_path / "o", "--weights", str(junk), "--ray-address", cluster.address,
                      "--workers", "1"))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "junk.pth" in lines[0] and "Traceback" not in err, err


def _finished(out):
    return [sid for sid in GOOD if reports.is_finished(os.path.join(out, sid))]


def _kill_group(pid):
    """The Ray processes a killed driver left (its session: gcs, raylet, agents), by their process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_driver_killed_mid_batch_resumes_to_the_same_files(reference, inputs, tmp_path):
    """A local Ray batch (the default engine, two workers) in a subprocess, SIGKILLed after two studies; the rerun
    skips what is finished and ends with the uninterrupted batch's files."""
    ref_out, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bmd_d2.cli.measure"] + _args(inputs, out, "--workers", "2")
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 300 and len(_finished(out)) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # killed mid-batch, not finished
        proc.send_signal(signal.SIGKILL)  # the driver alone
        proc.wait()
    finally:
        _kill_group(proc.pid)
        proc.stderr.close()
    done = _finished(out)
    assert len(done) >= 2
    if len(done) < len(GOOD):
        assert not (out / "summary.json").exists()  # the batch files are written at the end
    mtimes = {sid: os.path.getmtime(out / sid / reports.RESULT_JSON) for sid in done}

    rerun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _stdout, stderr = rerun.communicate(timeout=300)
    finally:
        _kill_group(rerun.pid)
    assert rerun.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    s, ref = _summary(out), _summary(ref_out)
    run = s.pop("this_run")
    ref.pop("this_run")
    assert s == ref
    # a worker busy when the driver died may still finish its study: skipped then, too
    assert run["skipped"] >= len(done) and run["skipped"] + run["measured"] == len(GOOD) and run["engine"] == "ray"
    for sid in done:  # finished studies were not measured again
        assert os.path.getmtime(out / sid / reports.RESULT_JSON) == mtimes[sid]
    for f in TABLES:
        assert (out / f).read_bytes() == (ref_out / f).read_bytes(), f
    for sid in GOOD:
        assert json.load(open(out / sid / reports.RESULT_JSON)) == json.load(open(ref_out / sid / reports.RESULT_JSON))
        assert not [p for p in os.listdir(out / sid) if ".tmp" in p]


# ---------------------------------------------------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------------------------------------------------
def test_manifest_parsing(tmp_path):
    (tmp_path / "data" / "a" / "dicom").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    (tmp_path / "data" / "b" / "x.dcm").write_bytes(b"")
    (tmp_path / "data" / "ct.nii.gz").write_bytes(b"")
    other = tmp_path / "elsewhere" / "a"
    other.mkdir(parents=True)
    m = tmp_path / "list.csv"
    m.write_text("path,study_id\ndata/a,\n\n" f"{tmp_path}/data/b,patient 7\ndata/ct.nii.gz,\n{other},\n")
    got = read_manifest(str(m))
    assert got == [("a", str(tmp_path / "data" / "a" / "dicom")), ("a-2", str(other)), ("ct", str(tmp_path / "data" /
                   "ct.nii.gz")), ("patient_7", str(tmp_path / "data" / "b"))]
    assert find_studies(str(m)) == got
    # a given id wins over a derived one; the derived one gives way
    m.write_text("study_id,path\n,data/a\na,data/b\n")
    assert read_manifest(str(m)) == [("a", str(tmp_path / "data" / "b")), ("a-2", str(tmp_path / "data" / "a" /
                                     "dicom"))]
    cases = [
        ("study,id\ndata/a,x\n", "list.csv: manifest has no 'path' column (columns: study, id)"),
        ("path\ndata/a\ndata/missing\n", "list.csv line 3: study not found: data/missing"),
        ("path,study_id\ndata/a,x\ndata/b,X\n", "list.csv line 3: study_id 'X' repeats line 2"),
        ("path\ndata/a\n./data/a/\n", "list.csv line 3: path './data/a/' repeats line 2"),
        ("path,study_id\n,x\n", "list.csv line 2: empty path"),
        ("path\n", "list.csv: manifest lists no study"),
    ]
    for text, message in cases:
        m.write_text(text)
        with pytest.raises(BMDError) as e:
            read_manifest(str(m))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_bad_manifest_exits_2(tmp_path, capsys):
    m = tmp_path / "studies.csv"
    m.write_text("path\nnowhere\n")
    assert main([str(m), "--config-file", CFG, "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: {m} line 2: study not found: nowhere"], err


def test_worker_reports_storage_it_cannot_see(tmp_path):
    w = StudyWorker.__new__(StudyWorker)  # the check alone: no Ray, no model
    w.out_root, w.host = str(tmp_path / "not_mounted"), "node-b"
    reason = w._not_visible(str(tmp_path))
    assert reason.startswith(f"output folder {tmp_path / 'not_mounted'} not found or not writable on worker node "
                             "node-b") and "every node mounts at the same path" in reason
    w.out_root = str(tmp_path)
    reason = w._not_visible(str(tmp_path / "gone"))
    assert reason.startswith(f"input {tmp_path / 'gone'} not found on worker node node-b") and "same path" in reason


def test_crash_cause_is_one_line():
    text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: StudyWorker\n\tpid: 12\n"
            "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
            "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
            "include: (1) the process was killed by the OOM killer")
    assert crash_cause(RuntimeError(text)) == (
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file.")
