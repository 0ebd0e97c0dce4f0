"""Helpers for the bmd-serve tests: node configs, small CT series, a pynetdicom sending client and a destination SCP."""
import os
import socket
import subprocess
import threading
import time
from typing import Dict, List, Optional

import yaml

from _dicom_fixtures import block_phantom, write_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
QUICK_OPTS = ["INPUT.DICOM.CACHE_DIR", "", "INPUT.DICOM.IMAGE_SIZE", "256"]
PHI = ("SYNTHETIC^FIXTURE", "SYNTHETIC", "FIXTURE", "SYN0001")
CALLER = "ORTHANC"
NODE_AE = "BMD_D2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(tmp_path, *, dest_port: int = 0, name: str = "node.yaml", **sections) -> str:
    """Write a node config into ``tmp_path`` (quick model, random weights); ``sections`` update the defaults by
    section (``series={"quiet_seconds": 1}``). Returns its path."""
    cfg = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port(), "folder": str(tmp_path / "node"),
                 "allowed_callers": [CALLER]},
        "series": {"quiet_seconds": 0.5, "modalities": ["CT"], "min_slices": 20, "max_slice_thickness_mm": 5.0},
        "destination": {"ae_title": "sender", "outputs": ["seg", "sr", "sc"],
                        "retry": {"first_delay_s": 0.5, "max_delay_s": 2.0, "max_attempts": 0}},
        "callers": {CALLER: {"host": "127.0.0.1", "port": dest_port or free_port()}},
        "storage": {"max_disk_gb": 50, "keep_received_hours": 24},
        "model": {"config_file": QUICK, "weights": "", "opts": list(QUICK_OPTS), "device": "cpu"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def make_series(folder, *, slices: int = 24, thickness: float = 4.0, modality: str = "CT",
                description: str = "ABDOMEN", study_uid: Optional[str] = None, series_uid: Optional[str] = None,
                seed: int = 0) -> List[str]:
    """A small block-phantom CT series (64×64 pixels, ``slices`` slices) written with pydicom; returns its files."""
    import pydicom

    hu, _ = block_phantom(shape=(slices, 64, 64), spacing=(thickness, 2.0, 2.0), seed=seed)
    paths = write_series(str(folder), hu, spacing=(thickness, 2.0, 2.0), modality=modality, study_uid=study_uid,
                         series_uid=series_uid, seed=seed, private_block=False)
    if description != "fixture":
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.SeriesDescription = description
            ds.save_as(p)
    return paths


def send(port: int, paths, *, calling: str = CALLER, called: str = NODE_AE, tls_args=None) -> List[int]:
    """C-STORE ``paths`` over one association (pynetdicom); returns the status of each, [] when not associated."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        return []
    out = []
    try:
        for p in paths:
            st = assoc.send_c_store(pydicom.dcmread(p))
            out.append(int(st.Status) if st and "Status" in st else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def echo(port: int, *, calling: str = CALLER, called: str = NODE_AE, tls_args=None) -> Optional[int]:
    """C-ECHO status, or None when no association was established."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st and "Status" in st else -1
    finally:
        assoc.release()


class Destination:
    """A pynetdicom Storage SCP standing in for the PACS: records (SOPClassUID, SOPInstanceUID, dataset) received.

    ``delay_s`` makes every C-STORE answer that much later (a slow destination).
    """

    CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7")

    def __init__(self, port: int, ae_title: str = CALLER, delay_s: float = 0.0):
        self.port, self.ae_title, self.delay_s = port, ae_title, delay_s
        self.received: List[tuple] = []
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event):
        if self.delay_s:
            time.sleep(self.delay_s)
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), ds))
        return 0x0000

    def start(self):
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        for uid in self.CLASSES:
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def sop_uids(self) -> set:
        with self._lock:
            return {r[1] for r in self.received}


def self_signed(tmp_path, name: str = "server") -> Dict[str, str]:
    """A self-signed certificate + key for 127.0.0.1 (openssl); returns {"certificate", "private_key"} paths."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make the test certificate)")
    crt, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return {"certificate": str(crt), "private_key": str(key)}


def wait_for(predicate, timeout: float = 60.0, poll: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (returned) or ``timeout`` passes (AssertionError)."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
