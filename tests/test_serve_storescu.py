"""dcmtk as a second real DICOM client of bmd-serve: ``echoscu`` (C-ECHO, the AE allow-list) and ``storescu``
(C-STORE of a copy of the example series); the node sends SEG/SR/SC back to the caller, here a pynetdicom Storage
SCP (:class:`_orthanc.Lab`: the session's node, shared with the Orthanc tests).

Skipped without dcmtk (Debian package ``dcmtk``), except under CI (then failed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _orthanc as peers  # noqa: E402

ROUND_TRIP_TIMEOUT_S = 300

@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The session's node and its peers (shared with the other real-client test module)."""
    yield from peers.shared_lab(tmp_path_factory)


@pytest.fixture(scope="module")
def tools():
    return {name: peers.require_binary(name) for name in ("echoscu", "storescu")}


@pytest.fixture(scope="module")
def series_files(tools, lab, tmp_path_factory):
    """Every 2nd slice of the example (2.5 mm apart) as another study: a series the node has not seen, half as many
    images to measure; written while the node loads its model."""
    lab.launch_node()
    return peers.example_series(tmp_path_factory.getbasetemp(), copy="storescu", every=2)


def _dcmtk(exe, *args, timeout=120):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_echoscu_allowed_and_refused(tools, lab, series_files):
    node = lab.started_node()
    ok = _dcmtk(tools["echoscu"], "-aet", "ECHOSCU", "-aec", node.aet, "127.0.0.1", node.port)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = _dcmtk(tools["echoscu"], "-aet", "INTRUDER", "-aec", node.aet, "127.0.0.1", node.port)
    assert refused.returncode != 0, "an AE title off the allow-list was accepted"
    assert "reject" in (refused.stdout + refused.stderr).lower(), refused.stdout + refused.stderr
    log = node.logs()
    refusals = [line for line in log.splitlines() if "refused" in line]
    assert any("INTRUDER" in line for line in refusals), f"refusal of INTRUDER not logged with its AE title:\n{log}"
    assert not any("ECHOSCU" in line for line in refusals), f"an allowed caller logged as refused:\n{log}"


def test_storescu_series_is_measured_and_delivered(tools, lab, series_files):
    files = series_files
    node = lab.started_node()
    source = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    sent = _dcmtk(tools["storescu"], "-aet", "STORESCU", "-aec", node.aet, "-R", "+sd", "127.0.0.1", node.port,
                  files[0].parent, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (row,) = node.wait_state(source.SeriesInstanceUID, "delivered", 1, timeout=ROUND_TRIP_TIMEOUT_S)
    assert row["instances"] == len(files) and row["version"] == 1
    wanted = set(peers.OUTPUT_CLASSES.values())
    got = peers.wait_for("SEG, SR and SC at the caller's SCP",
                         lambda: (lambda b: b if wanted <= set(b) else None)(lab.scp.by_class(source.StudyInstanceUID)),
                         30, log=node.log)
    assert set(lab.scp.callers) == {node.aet}
    result = json.loads((Path(row["result_dir"]) / "result.json").read_text())
    assert len(got[peers.SEG_CLASS].SegmentSequence) == len(result["vertebrae"]) > 0
    assert got[peers.SR_CLASS].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # no PHI in anything the node logged: the patient's name/ID and the study/series UIDs never appear
    log = node.logs()
    for secret in (str(source.PatientName), source.PatientID, source.StudyInstanceUID, source.SeriesInstanceUID):
        if secret:
            assert secret not in log, "PHI in the node log"
