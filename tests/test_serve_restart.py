"""Kill-and-restart (issue 20, item 2): ``bmd-serve run`` as a subprocess, SIGKILLed while receiving a series, while
measuring another and while sending it; after the restart every completely received series is measured exactly once
(one ``v1`` folder, one measuring → measured transition) and delivered (the destination got each SOP instance;
repeats only of the same SOPInstanceUID). Uses the test-only hook ``BMD_SERVE_TEST_PAUSE`` (bmd_d2.serve.worker)."""
import os
import signal
import subprocess
import sys

import pydicom
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _serve_fixtures import PHI, ROOT, Destination, echo, free_port, make_series, node_config, send, wait_for  # noqa

pytest.importorskip("pynetdicom")

from bmd_d2.serve.config import load_node_config  # noqa: E402
from bmd_d2.serve.store import Store, uid_hash  # noqa: E402
from bmd_d2.serve.worker import PAUSE_ENV  # noqa: E402


def _start(cfg_path, log, *extra, env=None):
    e = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    e.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "bmd_d2.cli.serve", "run", "--config", cfg_path, *extra],
                            cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT)


def _rows(folder):
    try:
        store = Store(folder, readonly=True)
    except (FileNotFoundError, OSError):
        return {}, []
    try:
        return {s["series_uid"]: s for s in store.all_series()}, store.transitions()
    finally:
        store.close()


def _state(folder, uid):
    return (_rows(folder)[0].get(uid) or {}).get("state")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_while_receiving_measuring_sending_then_restart(tmp_path):
    dest_port = free_port()
    path = node_config(tmp_path, dest_port=dest_port, series={"quiet_seconds": 3},
                       destination={"retry": {"first_delay_s": 0.5, "max_delay_s": 1.0, "max_attempts": 0}})
    cfg = load_node_config(path)
    port, folder = cfg.node.port, cfg.folder
    a = make_series(tmp_path / "a")
    b = make_series(tmp_path / "b", seed=3)
    uid_a, uid_b = (str(pydicom.dcmread(p[0]).SeriesInstanceUID) for p in (a, b))
    log = open(tmp_path / "node_stdout.log", "ab")
    procs = []
    dest = Destination(dest_port, delay_s=3.0).start()
    try:
        # 1. A measuring (held by the test pause), B half received: SIGKILL
        proc = _start(path, log, env={"BMD_SERVE_TEST_PAUSE": "measuring:120"})
        procs.append(proc)
        wait_for(lambda: echo(port) == 0, timeout=180, poll=0.5, what="node 1 listening")
        assert send(port, a) == [0] * len(a)
        wait_for(lambda: _state(folder, uid_a) == "measuring", timeout=60, what="A measuring")
        assert send(port, b[:12]) == [0] * 12
        assert _state(folder, uid_b) == "receiving"
        _kill(proc)

        # 2. restart; B re-sent in full; A measured, then SIGKILL while its objects are being sent (slow destination)
        proc = _start(path, log)
        procs.append(proc)
        wait_for(lambda: echo(port) == 0, timeout=180, poll=0.2, what="node 2 listening")
        assert send(port, b) == [0] * len(b)
        wait_for(lambda: _state(folder, uid_a) == "sending" and dest.received, timeout=120, what="A sending")
        _kill(proc)
        assert _state(folder, uid_a) == "sending"

        # 3. restart until idle: everything delivered
        dest.delay_s = 0.0
        proc = _start(path, log, "--once")
        procs.append(proc)
        assert proc.wait(timeout=240) == 0

        # 4. SIGTERM is a clean stop (exit 0), the queue is left as it was
        proc = _start(path, log)
        procs.append(proc)
        wait_for(lambda: echo(port) == 0, timeout=180, poll=0.2, what="node 4 listening")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        dest.stop()
        log.close()

    rows, transitions = _rows(folder)
    assert set(rows) == {uid_a, uid_b}  # one receipt each: B's re-sent instances joined its receipt
    expected = set()
    for uid in (uid_a, uid_b):
        s = rows[uid]
        assert (s["state"], s["version"], s["receipt"], s["instances"]) == ("delivered", 1, 1, 24), dict(s)
        measured = [t for t in transitions if t["series_uid"] == uid and (t["old"], t["new"]) == ("measuring",
                                                                                                  "measured")]
        assert len(measured) == 1
        series_dir = os.path.dirname(s["result_dir"])
        assert os.listdir(series_dir) == ["v1"]
        assert series_dir.endswith(os.path.join(uid_hash(s["study_uid"]), uid_hash(uid)))
        expected |= {str(pydicom.dcmread(os.path.join(s["result_dir"], f)).SOPInstanceUID)
                     for f in os.listdir(s["result_dir"]) if f.endswith(".dcm")}
    recovered = [(t["old"], t["new"]) for t in transitions if t["reason"] == "recovered after a restart"]
    assert ("measuring", "queued") in recovered and ("sending", "measured") in recovered
    assert expected and dest.sop_uids() == expected
    text = open(tmp_path / "node_stdout.log", errors="replace").read()
    text += open(os.path.join(folder, "logs", "node.log"), errors="replace").read()
    assert "Traceback" not in text and text.rstrip().endswith("stopped")
    for value in PHI + (uid_a, uid_b):
        assert value not in text
