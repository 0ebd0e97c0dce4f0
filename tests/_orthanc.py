"""Real DICOM peers for the bmd-serve tests: an Orthanc PACS, dcmtk's clients, and the node itself, on loopback ports.

* :class:`Orthanc` starts ``/usr/sbin/Orthanc`` (Debian package ``orthanc``) with a temporary configuration and
  storage on free ports, and talks to its REST API with ``urllib`` (upload, send to a modality, list a study's series,
  download an instance).
* :class:`Node` writes a node configuration (the spec in docs/pacs.md) and runs ``python -m bmd_d2.cli.serve run`` as a
  subprocess (one model load per process), with ``status`` to read its queue as JSON.
* :class:`StorageSCP`: a pynetdicom Storage SCP here, keeping what the node sends it.
* :class:`Lab`: one node for the whole session (the Orthanc and the dcmtk test modules share it, see
  :func:`shared_lab`), its Orthanc and SCP on ports reserved before anything starts.
* :func:`example_series` writes the demo phantom (the bundled example study) once per test session.

Without the binaries (Orthanc, dcmtk) the tests that need them skip with the reason, except under CI (environment
variable ``CI`` set), where a missing binary fails them: ``tools/test.sh`` installs them as root.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _dciodvfy import in_ci  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "configs", "bmd_default.yaml")
DEFAULT_WEIGHTS = os.path.join(ROOT, "models", "bmd_rcnn_MFEFPN_R18_cpu.pth")
ORTHANC_AET = "ORTHANC"
NODE_AET = "BMD_D2"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OUTPUT_CLASSES = {"seg": SEG_CLASS, "sr": SR_CLASS, "sc": SC_CLASS}
PACKAGES = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk"}


def require_binary(name: str) -> str:
    """The path of executable ``name`` (Orthanc, storescu, echoscu); skips without it, fails under CI."""
    exe = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if exe is None:
        msg = f"{name} (Debian package {PACKAGES.get(name, name)}) is not installed: the real-PACS test cannot run"
        if in_ci():
            pytest.fail(f"{msg} (CI is set: it is required)")
        pytest.skip(msg)
    return exe


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.25,
             log: Optional[Path] = None):
    """Call ``check`` until it returns something truthy (returned) or ``timeout`` s pass (AssertionError naming
    ``what`` and the tail of ``log``)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            tail = ""
            if log is not None and log.exists():
                tail = "\n--- " + str(log) + " (tail) ---\n" + "\n".join(log.read_text(errors="replace")
                                                                        .splitlines()[-40:])
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(every)


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 20.0) -> Optional[int]:
    """SIGTERM ``proc``, then SIGKILL if it has not exited after ``timeout`` s; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ------------------------------------------------------------------------------------------------------- Orthanc
class Orthanc:
    """One Orthanc server on free loopback ports with its storage in ``folder``.

    Args:
        folder: created; holds ``orthanc.json``, ``storage/`` and ``orthanc.log``.
        modalities: DicomModalities entries, name -> (AE title, host, port).
        lua: Lua source written to ``routing.lua`` and loaded (``LuaScripts``), or None.
        stable_age: seconds without a new instance before Orthanc calls a series stable.
    """

    def __init__(self, folder: Path, modalities: Dict[str, tuple], lua: Optional[str] = None, stable_age: int = 2):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = ORTHANC_AET
        self.log = self.folder / "orthanc.log"
        cfg = {
            "Name": "bmd_d2-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "StorageCompression": False,
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "DicomScuTimeout": 60,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "Plugins": [], "StableAge": int(stable_age), "ConcurrentJobs": 2, "HttpTimeout": 120,
            "LuaScripts": [],
        }
        if lua is not None:
            script = self.folder / "routing.lua"
            script.write_text(lua)
            cfg["LuaScripts"] = [str(script)]
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=2))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "Orthanc":
        exe = require_binary("Orthanc")
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen([exe, "--verbose", str(self.config)], stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=str(self.folder))
        wait_for("Orthanc's REST API", self._up, timeout, log=self.log)
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')}")
        try:
            return bool(self.get("/system"))
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 2 s: Orthanc 1.10 lingers ~8 s in its Lua engine's sleep, and this one's
        storage is thrown away."""
        stop_process(self.proc, timeout=2.0)

    # REST
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def request(self, method: str, path: str, body=None, timeout: float = 120.0) -> bytes:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/dicom" if isinstance(body, bytes) else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"Orthanc {method} {path}: HTTP {e.code} {e.read()[:500]!r}") from None

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def post(self, path: str, body=None):
        raw = self.request("POST", path, body)
        return json.loads(raw) if raw.strip() else None

    def upload(self, files: List[Path]) -> Dict[str, str]:
        """POST every file to /instances; returns the Orthanc IDs {"study": ..., "series": ...} of the last one."""
        last = {}
        for path in files:
            rec = self.post("/instances", Path(path).read_bytes())
            assert rec.get("Status") in ("Success", "AlreadyStored"), rec
            last = {"study": rec["ParentStudy"], "series": rec["ParentSeries"]}
        return last

    def send(self, modality: str, resources: List[str]) -> dict:
        """C-STORE ``resources`` (Orthanc IDs) to DicomModalities entry ``modality``, synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": list(resources), "Synchronous": True})

    def echo(self, modality: str) -> bool:
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except AssertionError:
            return False

    def study_series(self, study_id: str) -> List[dict]:
        return self.get(f"/studies/{study_id}/series")

    def series_by_class(self, study_id: str) -> Dict[str, List[str]]:
        """SOP Class UID -> the instance IDs of that class in the study (first instance of each series looked at)."""
        out: Dict[str, List[str]] = {}
        for s in self.study_series(study_id):
            if not s["Instances"]:
                continue
            sop_class = self.request("GET", f"/instances/{s['Instances'][0]}/metadata/SopClassUid")
            out.setdefault(sop_class.decode().strip(), []).extend(s["Instances"])
        return out

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


# ---------------------------------------------------------------------------------------------------- the node
class Node:
    """A bmd-serve node run as a subprocess with a configuration written from keyword overrides.

    Args:
        tmp: a folder for the node (``tmp/node`` is the node's folder, ``tmp/node.yaml`` its configuration,
            ``tmp/node.log`` its stdout/stderr).
        sections: config sections merged over the defaults below (one level deep), e.g.
            ``{"node": {"allowed_callers": ["ORTHANC"]}, "callers": {...}}``.
    """

    def __init__(self, tmp: Path, sections: Optional[dict] = None):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        cfg = {
            "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port(),
                     "folder": str(self.tmp / "node"), "allowed_callers": [ORTHANC_AET]},
            "series": {"quiet_seconds": 2, "modalities": ["CT"], "min_slices": 20, "max_slice_thickness_mm": 5.0},
            "destination": {"ae_title": "sender", "outputs": ["seg", "sr", "sc"],
                            "retry": {"first_delay_s": 1, "max_delay_s": 5, "max_attempts": 0}},
            "callers": {},
            "storage": {"max_disk_gb": 50, "keep_received_hours": 24},
            "model": {"config_file": DEFAULT_MODEL, "weights": DEFAULT_WEIGHTS, "opts": [], "device": "cpu"},
        }
        for key, value in (sections or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.cfg = cfg
        self.port = int(cfg["node"]["port"])
        self.aet = cfg["node"]["ae_title"]
        self.config = self.tmp / "node.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log = self.tmp / "node.log"
        self.proc: Optional[subprocess.Popen] = None

    def command(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "bmd_d2.cli.serve", *args, "--config", str(self.config)]

    def launch(self) -> "Node":
        """Start the process (it loads the model before it listens); :meth:`wait_ready` waits for it."""
        if self.proc is None:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen(self.command("run"), stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                             env=env)
        return self

    def wait_ready(self, timeout: float = 180.0) -> "Node":
        wait_for(f"bmd-serve answering C-ECHO on port {self.port}", self._up, timeout, log=self.log)
        return self

    def start(self, timeout: float = 180.0) -> "Node":
        return self.launch().wait_ready(timeout)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"bmd-serve exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text(errors='replace')[-4000:]}")
        return self.echo()

    def echo(self, calling: Optional[str] = None) -> bool:
        """C-ECHO (pynetdicom) as ``calling`` (default: the first allowed caller); True when it succeeded."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=calling or self.cfg["node"]["allowed_callers"][0])
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aet)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.Status == 0x0000
        finally:
            assoc.release()

    def stop(self) -> Optional[int]:
        return stop_process(self.proc, timeout=60.0)

    def status(self, cli: bool = False) -> dict:
        """What ``bmd-serve status`` prints. ``cli``: run the command (seconds: it imports the whole package);
        otherwise the same function in this process (what the polling loops use)."""
        if cli:
            proc = subprocess.run(self.command("status"), capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert proc.returncode == 0, f"bmd-serve status: rc {proc.returncode}\n{proc.stderr}"
            return json.loads(proc.stdout)
        from bmd_d2.serve.config import load_node_config
        from bmd_d2.serve.node import status

        return json.loads(json.dumps(status(load_node_config(str(self.config)))))

    def series(self) -> List[dict]:
        """The status objects of every series version the node knows."""
        return self.status()["series"]

    def series_of(self, series_uid: str) -> List[dict]:
        """The status objects of the versions of one series."""
        h = uid_hash(series_uid)
        return [r for r in self.series() if r["series_uid_hash"] == h]

    def wait_state(self, series_uid: str, states, count: int = 1, timeout: float = 180.0) -> List[dict]:
        """Wait until ``count`` versions of series ``series_uid`` are in one of ``states``; returns them. A version
        reaching ``failed``/``delivery_failed``/``filtered`` when that is not asked for fails at once."""
        states = {states} if isinstance(states, str) else set(states)
        bad = {"failed", "delivery_failed", "filtered"} - states

        def check():
            rows = self.series_of(series_uid)
            wrong = [r for r in rows if r["state"] in bad]
            if wrong:
                raise AssertionError(f"series ended {wrong[0]['state']}: {wrong}\n"
                                     f"{self.log.read_text(errors='replace')[-4000:]}")
            hit = [r for r in rows if r["state"] in states]
            return hit if len(hit) >= count else None

        return wait_for(f"{count} version(s) of series {uid_hash(series_uid)} in {sorted(states)}", check, timeout,
                        every=0.5, log=self.log)

    def logs(self) -> str:
        """Everything the node logged: its stdout/stderr and ``<folder>/logs/*``."""
        texts = [self.log.read_text(errors="replace")] if self.log.exists() else []
        texts += [p.read_text(errors="replace") for p in sorted((self.tmp / "node" / "logs").glob("*"))]
        return "\n".join(texts)


def uid_hash(uid: str) -> str:
    """How the node names a UID in ``status`` and its logs: SHA-1, 12 hex digits."""
    return hashlib.sha1(str(uid).encode()).hexdigest()[:12]


# -------------------------------------------------------------------------------------------- a Storage SCP here
class StorageSCP:
    """A pynetdicom Storage SCP on a free loopback port (any called AE title) that keeps what it receives."""

    def __init__(self, ae_title: str = "DEST"):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.received = []
        self.callers = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self.callers.append(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def by_class(self, study_uid: str) -> Dict[str, object]:
        """SOP Class UID -> the last dataset of that class received for ``study_uid``."""
        with self._lock:
            return {ds.SOPClassUID: ds for ds in self.received if ds.StudyInstanceUID == study_uid}

    def stop(self):
        self.server.shutdown()


# -------------------------------------------------------------------------------------- one lab for the session
def routing_lua() -> str:
    """The auto-forwarding script of docs/pacs.md ("Connecting a PACS"), exactly as the documentation shows it."""
    text = (Path(ROOT) / "docs" / "pacs.md").read_text()
    m = re.search(r"```lua\n(.*?)```", text, re.S)
    assert m, "docs/pacs.md has no ```lua block (the Orthanc routing example)"
    return m.group(1)


class Lab:
    """One node (one model load) for every test of the session, its peers on reserved loopback ports: an Orthanc
    (started by the first test that needs it, with the Lua routing of docs/pacs.md) and a Storage SCP here.

    The node allows ``ORTHANC``, ``STORESCU`` and ``ECHOSCU``; it sends results back to the caller (destination
    ``sender``): to Orthanc for ``ORTHANC``, to the SCP for ``STORESCU``.
    """

    CALLERS = (ORTHANC_AET, "STORESCU", "ECHOSCU")

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        node_port = free_port()
        self.orthanc = Orthanc(self.tmp / "orthanc", {"BMD": (NODE_AET, "127.0.0.1", node_port)}, lua=routing_lua())
        self.scp = StorageSCP()
        self.node = Node(self.tmp, {"node": {"port": node_port, "allowed_callers": list(self.CALLERS)},
                                    "callers": {ORTHANC_AET: {"host": "127.0.0.1", "port": self.orthanc.dicom_port},
                                                "STORESCU": {"host": "127.0.0.1", "port": self.scp.port}}})
        self._node_up = False

    def launch_node(self) -> None:
        """Start the node without waiting: the model loads while the caller prepares its series."""
        self.node.launch()

    def started_node(self) -> Node:
        if not self._node_up:
            self.node.launch().wait_ready()
            self._node_up = True
        return self.node

    def started_orthanc(self) -> Orthanc:
        if self.orthanc.proc is None:
            self.orthanc.start()
        return self.orthanc

    def close(self) -> None:
        if self.orthanc.proc is not None and self.orthanc.proc.poll() is None:
            self.orthanc.proc.send_signal(signal.SIGTERM)  # both stop at the same time
        rc = self.node.stop()
        self.orthanc.stop()
        self.scp.stop()
        assert rc in (None, 0), f"bmd-serve did not stop cleanly on SIGTERM (rc {rc})\n{self.node.logs()[-4000:]}"


_LAB: Optional[Lab] = None


def shared_lab(tmp_path_factory):
    """Body of a session fixture (``yield from shared_lab(tmp_path_factory)`` in each test module that needs it):
    the first to ask creates the :class:`Lab`, which lives until the end of the session."""
    global _LAB
    owner = _LAB is None
    if owner:
        _LAB = Lab(tmp_path_factory.mktemp("lab"))
    try:
        yield _LAB
    finally:
        if owner:
            lab, _LAB = _LAB, None
            lab.close()


# ------------------------------------------------------------------------------------------------ the example CT
def example_series(base: Path, copy: str = "", every: int = 1) -> List[Path]:
    """The demo phantom (bundled example study: :data:`~bmd_d2.phantoms.EXAMPLE_SEED`, example options) as a CT
    DICOM series under ``base`` (the session's pytest base temp; written once); its files in slice order.

    ``copy`` (non-empty): every ``every``-th image of it as another study and series (new Study/Series/SOP Instance
    UIDs derived from ``copy``), so that the node takes it for a series it has not seen.
    """
    from bmd_d2.phantoms import EXAMPLE_SEED, GENERATOR_VERSION, example_options, generate_study, write_dicom_series

    out = Path(base) / (f"example_series_{copy}" if copy else "example_series")
    done = out / f"complete_v{GENERATOR_VERSION}.json"
    if done.exists():
        return [out / name for name in json.loads(done.read_text())]
    if copy:
        import pydicom
        from pydicom.uid import generate_uid

        study, series = (str(generate_uid(entropy_srcs=[copy, what])) for what in ("study", "series"))
        paths = []
        (out / "dicom").mkdir(parents=True, exist_ok=True)
        for k, src in enumerate(example_series(base)[::every]):
            ds = pydicom.dcmread(str(src))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            sop = str(generate_uid(entropy_srcs=[copy, str(k)]))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            paths.append(out / "dicom" / src.name)
            ds.save_as(str(paths[-1]), enforce_file_format=True)
    else:
        study = generate_study(EXAMPLE_SEED, example_options(), "example_0001")
        paths = write_dicom_series(study, out / "dicom")
    done.write_text(json.dumps([str(p.relative_to(out)) for p in paths]))
    return paths
