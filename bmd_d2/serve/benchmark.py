"""Throughput of a bmd-serve node: studies per hour with 1 and more concurrent senders.

One node process (``python -m bmd_d2.cli.serve run``, one model load) receives ``n`` copies of the example study (the
demo phantom, each copy with its own Study/Series/SOP Instance UIDs) from ``senders`` concurrent pynetdicom C-STORE
clients and sends its SEG/SR/SC to a Storage SCP run here. A pass is timed from the first C-STORE to the last output
received; studies per hour = ``n`` / that time. The figure includes the node's quiet time (``quiet_seconds``: a series
is complete only after it) and is bound by the node's single measuring worker once the senders outpace it.
"""
import io
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import BMDError

logger = logging.getLogger(__name__)

CALLING_AET = "BENCH"
DEST_AET = "BENCH_DEST"
OUTPUT_CLASSES = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "sr": "1.2.840.10008.5.1.4.1.1.88.34",
                  "sc": "1.2.840.10008.5.1.4.1.1.7"}


@dataclass
class PassResult:
    """One timed pass: ``studies`` series sent by ``senders`` clients."""

    senders: int
    studies: int
    seconds: float  # first C-STORE → last output received
    studies_per_hour: float
    latency_s: List[float] = field(default_factory=list)  # per study: its first C-STORE → its last output
    send_s: List[float] = field(default_factory=list)  # per study: the C-STORE of its series


def example_files(folder: Path) -> List[Path]:
    """The example study (demo phantom) as a DICOM series under ``folder`` (written once); its files."""
    from ..phantoms import EXAMPLE_SEED, GENERATOR_VERSION, example_options, generate_study, write_dicom_series

    out = Path(folder) / f"example_v{GENERATOR_VERSION}"
    files = sorted(out.glob("*.dcm"))
    if files and (out / "complete").exists():
        return files
    files = write_dicom_series(generate_study(EXAMPLE_SEED, example_options(), "example_0001"), out)
    (out / "complete").write_text("")
    return sorted(files)


class _Destination:
    """A Storage SCP that records when each output of each study arrived."""

    def __init__(self, port: int):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrived: Dict[str, Dict[str, float]] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=DEST_AET)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            self.arrived.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPClassUID)] = time.monotonic()
        return 0x0000

    def done(self, study_uid: str, classes: Sequence[str]) -> Optional[float]:
        """When the last of ``classes`` arrived for ``study_uid``, or None while one is missing."""
        with self.lock:
            got = self.arrived.get(study_uid, {})
            return max(got[c] for c in classes) if all(c in got for c in classes) else None

    def stop(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_node_config(folder: Path, port: int, dest_port: int, model_config: str, weights: str, device: str,
                      quiet_seconds: float) -> Path:
    """A node configuration for the benchmark (allowed caller :data:`CALLING_AET`, outputs to the local SCP)."""
    import yaml

    cfg = {
        "node": {"ae_title": "BMD_D2", "host": "127.0.0.1", "port": port, "folder": str(folder / "node"),
                 "allowed_callers": [CALLING_AET]},
        "series": {"quiet_seconds": quiet_seconds, "modalities": ["CT"], "min_slices": 20,
                   "max_slice_thickness_mm": 5.0},
        "destination": {"ae_title": DEST_AET, "host": "127.0.0.1", "port": dest_port, "outputs": list(OUTPUT_CLASSES),
                        "retry": {"first_delay_s": 1, "max_delay_s": 5, "max_attempts": 0}},
        "storage": {"max_disk_gb": 50, "keep_received_hours": 0},
        "model": {"config_file": model_config, "weights": weights, "opts": [], "device": device},
    }
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class _Series:
    """The template series read once; :meth:`copy` gives the datasets of copy ``i`` with its own UIDs."""

    def __init__(self, files: Sequence[Path]):
        import pydicom

        self.raw = [Path(f).read_bytes() for f in files]
        self.transfer_syntax = str(pydicom.dcmread(io.BytesIO(self.raw[0]), stop_before_pixels=True)
                                   .file_meta.TransferSyntaxUID)

    @staticmethod
    def study_uid(tag: str) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=[tag, "study"]))

    def copy(self, tag: str):
        """The datasets of copy ``tag``, one at a time (parsed while sending, as a PACS reads its files)."""
        import pydicom
        from pydicom.uid import generate_uid

        study, series = self.study_uid(tag), str(generate_uid(entropy_srcs=[tag, "series"]))
        for k, raw in enumerate(self.raw):
            ds = pydicom.dcmread(io.BytesIO(raw))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(k)])
            yield ds


def _send(datasets, transfer_syntax: str, port: int) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(CTImageStorage, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="BMD_D2")
    if not assoc.is_established:
        raise BMDError(f"benchmark: the node on port {port} refused the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                raise BMDError(f"benchmark: C-STORE failed (status {getattr(status, 'Status', None)})")
    finally:
        assoc.release()


def timed_pass(template: _Series, node_port: int, dest: _Destination, senders: int, studies: int, tag: str,
               timeout_s: float) -> PassResult:
    """Send ``studies`` copies of ``template`` with ``senders`` concurrent clients; wait for all outputs."""
    tags = [f"{tag}-{i}" for i in range(studies)]
    study_uids = [template.study_uid(t) for t in tags]
    todo: "queue.Queue[int]" = queue.Queue()
    for i in range(studies):
        todo.put(i)
    started: Dict[int, float] = {}
    send_s: Dict[int, float] = {}
    errors: List[BaseException] = []

    def worker():
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            started[i] = time.monotonic()
            try:
                _send(template.copy(tags[i]), template.transfer_syntax, node_port)
            except BaseException as e:  # reported after the pass
                errors.append(e)
                return
            send_s[i] = time.monotonic() - started[i]

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    classes = list(OUTPUT_CLASSES.values())
    end: Dict[int, float] = {}
    while len(end) < studies:
        if errors:
            raise BMDError(f"benchmark: a sender failed: {errors[0]}")
        if time.monotonic() - t0 > timeout_s:
            missing = studies - len(end)
            raise BMDError(f"benchmark: {missing} of {studies} studies not delivered after {timeout_s:.0f} s")
        for i, study_uid in enumerate(study_uids):
            if i not in end:
                t = dest.done(study_uid, classes)
                if t is not None:
                    end[i] = t
        time.sleep(0.2)
    for t in threads:
        t.join()
    seconds = max(end.values()) - t0
    return PassResult(senders=senders, studies=studies, seconds=round(seconds, 2),
                      studies_per_hour=round(studies / seconds * 3600.0, 1),
                      latency_s=[round(end[i] - started[i], 2) for i in range(studies)],
                      send_s=[round(send_s[i], 2) for i in range(studies)])


def run_benchmark(work: Path, studies: int, senders: Sequence[int] = (1, 4), model_config: str = "",
                  weights: str = "", device: str = "cpu", quiet_seconds: float = 10.0,
                  timeout_s: float = 3600.0) -> Dict:
    """Start a node in ``work``, time one pass per entry of ``senders``; returns the figures (JSON-ready).

    Args:
        work: a folder (created) for the node, its log and the example series.
        studies: series sent per pass.
        senders: concurrent clients of each pass.
        model_config, weights, device: the node's ``model`` section.
        quiet_seconds: the node's ``series.quiet_seconds``.
        timeout_s: per pass.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    template = _Series(example_files(work / "example"))
    node_port, dest_port = _free_port(), _free_port()
    config = write_node_config(work, node_port, dest_port, model_config, weights, device, quiet_seconds)
    dest = _Destination(dest_port)
    log_path = work / "node.log"
    env = {**os.environ}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bmd_d2.cli.serve", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t_start = time.monotonic()
        _wait_listening(proc, node_port, log_path)
        startup_s = time.monotonic() - t_start
        # one warm-up study: the first measurement pays for lazy initialisation, which is no throughput
        warm = timed_pass(template, node_port, dest, 1, 1, "warmup", timeout_s)
        passes = [timed_pass(template, node_port, dest, n, studies, f"pass{n}", timeout_s) for n in senders]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        dest.stop()
    return {"studies_per_pass": studies, "slices_per_study": len(template.raw), "quiet_seconds": quiet_seconds,
            "device": device, "cpu_count": os.cpu_count(), "node_startup_s": round(startup_s, 1),
            "warmup_study_s": warm.seconds, "passes": [asdict(p) for p in passes]}


def _wait_listening(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 300.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BMDError(f"benchmark: bmd-serve exited with {proc.returncode} (see {log_path})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.25)
    raise BMDError(f"benchmark: bmd-serve not listening on port {port} after {timeout:.0f} s (see {log_path})")
