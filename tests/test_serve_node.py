"""bmd-serve in one process: config errors, allow-list, C-ECHO, completion and filters, file modes, measurement and
delivery with retry, duplicates and versions, PHI-free logs, disk limit, TLS, status (quick config, random weights)."""
import json
import logging
import os
import ssl
import stat
import sys
import time

import pydicom
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _serve_fixtures import (CALLER, PHI, Destination, echo, free_port, make_series, node_config,  # noqa: E402
                             self_signed, send)

pytest.importorskip("pynetdicom")

from bmd_d2.cli.serve import main  # noqa: E402
from bmd_d2.errors import BMDError  # noqa: E402
from bmd_d2.serve.config import load_node_config  # noqa: E402
from bmd_d2.serve.node import Node, status  # noqa: E402
from bmd_d2.serve.store import uid_hash  # noqa: E402


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """One quick-config predictor (random weights) shared by the tests that measure."""
    import torch

    from bmd_d2.serve.worker import build_predictor

    torch.manual_seed(0)
    return build_predictor(load_node_config(node_config(tmp_path_factory.mktemp("pred"))))


def _node(path, predictor=None):
    node = Node(load_node_config(path), predictor=predictor if predictor is not None else _no_model)
    node.start()
    return node


def _no_model(files, study_id=None):
    raise AssertionError("this test measures nothing")


def _drain(node, until, timeout=60.0):
    """Step the worker until ``until()`` is true."""
    end = time.time() + timeout
    while time.time() < end:
        if until():
            return
        if not node.worker.step():
            time.sleep(0.05)
    raise AssertionError("worker did not reach the expected state")


def _states(node):
    return {(s["series_uid"], s["version"]): s for s in node.store.all_series()}


# ---------------------------------------------------------------------------------------------------------------------
def test_config_errors_are_one_line(tmp_path, capsys):
    good = node_config(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a certificate")
    assert main(["check", "--config", good]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    cases = {
        "port": (dict(node={"port": 70000}), "node.port: 70000 is not a port"),
        "key": (dict(series={"quiet_secs": 3}), "series.quiet_secs: unknown key"),
        "tls": (dict(node={"tls": {"certificate": "missing.crt", "private_key": "missing.key"}}),
                "node.tls.certificate: cannot read"),
        "pem": (dict(node={"tls": {"certificate": "garbage.pem", "private_key": "garbage.pem"}}),
                "node.tls.private_key: certificate/key do not load"),
        "type": (dict(storage={"max_disk_gb": "lots"}), "storage.max_disk_gb: expected a number"),
        "regex": (dict(series={"exclude": {"SeriesDescription": "(["}}), "series.exclude.SeriesDescription: bad"),
        "keyword": (dict(series={"include": {"NotAKeyword": "x"}}), "series.include.NotAKeyword: not a DICOM"),
    }
    for name, (sections, expected) in cases.items():
        path = node_config(tmp_path, name=f"{name}.yaml", **sections)
        with pytest.raises(BMDError) as e:
            load_node_config(path)
        assert expected in str(e.value) and path in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert main(["check", "--config", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert main(["status", "--config", str(tmp_path / "nothing.yaml")]) == 2
    assert "cannot read the node config" in capsys.readouterr().err


def test_caller_allow_list_and_echo(tmp_path, caplog):
    node = _node(node_config(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="bmd_d2"):
            assert echo(node.scp.port) == 0x0000
            assert echo(node.scp.port, calling="INTRUDER") is None
            assert echo(node.scp.port, called="WRONG_AE") is None
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("'INTRUDER'" in m and "calling AE title not recognised" in m for m in refused), refused
    finally:
        node.close()


def test_completion_filters_and_file_modes(tmp_path):
    path = node_config(tmp_path, series={"quiet_seconds": 30, "exclude": {"SeriesDescription": "(?i)scout"}})
    node = _node(path)
    try:
        series = {"ok": make_series(tmp_path / "ok"), "mr": make_series(tmp_path / "mr", modality="MR"),
                  "few": make_series(tmp_path / "few", slices=10), "thick": make_series(tmp_path / "thick",
                                                                                        thickness=8.0),
                  "scout": make_series(tmp_path / "scout", description="Scout view")}
        for paths in series.values():
            assert send(node.scp.port, paths) == [0] * len(paths)
        uids = {k: str(pydicom.dcmread(v[0]).SeriesInstanceUID) for k, v in series.items()}
        node.worker.complete_quiet()
        assert all(s["state"] == "receiving" for s in node.store.all_series())  # not quiet yet
        node.worker.clock = lambda: time.time() + 31  # 30 s later
        node.worker.complete_quiet()
        got = {k: node.store.get(uid, 1) for k, uid in uids.items()}
        assert got["ok"]["state"] == "queued" and got["ok"]["instances"] == 24
        assert got["mr"]["state"] == "filtered" and "modality MR" in got["mr"]["reason"]
        assert got["few"]["state"] == "filtered" and "10 slices" in got["few"]["reason"]
        assert got["thick"]["state"] == "filtered" and "slice thickness 8 mm" in got["thick"]["reason"]
        assert got["scout"]["state"] == "filtered" and "series.exclude.SeriesDescription" in got["scout"]["reason"]
        for r in node.store.instances(uids["ok"], 1):
            assert stat.S_IMODE(os.stat(r["path"]).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(r["path"])).st_mode) == 0o700
        for p in (node.cfg.folder, os.path.join(node.cfg.folder, "incoming")):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(node.cfg.folder, "node.db")).st_mode) == 0o600
    finally:
        node.close()


def test_disk_limit_refuses_with_a700(tmp_path):
    node = _node(node_config(tmp_path, storage={"max_disk_gb": 1e-6}))  # 1 kB: the first instance fills it
    try:
        paths = make_series(tmp_path / "s", slices=3)
        assert send(node.scp.port, paths) == [0, 0xA700, 0xA700]
    finally:
        node.close()


def test_measure_retry_duplicate_version_and_no_phi(tmp_path, predictor, caplog):
    """Destination down → retry_wait with doubling delays → destination up → delivered; unchanged re-send →
    duplicate; changed re-send → v2 with new output UIDs; no PHI in any log line, hashed ids present."""
    from bmd_d2.utils.logs import setup_cli_logging

    dest_port = free_port()
    path = node_config(tmp_path, dest_port=dest_port, destination={
        "retry": {"first_delay_s": 0.3, "max_delay_s": 0.6, "max_attempts": 0}})
    cfg = load_node_config(path)
    from bmd_d2.serve.node import add_file_log

    handler = setup_cli_logging()
    file_log = add_file_log(cfg, handler)
    node = Node(cfg, predictor=predictor)
    node.start()
    dest = Destination(dest_port)
    try:
        caplog.set_level(logging.INFO)
        study = pydicom.uid.generate_uid()
        series_uid = pydicom.uid.generate_uid()
        paths = make_series(tmp_path / "a", study_uid=study, series_uid=series_uid)
        assert send(node.scp.port, paths) == [0] * 24
        _drain(node, lambda: node.store.get(series_uid, 1)["state"] == "retry_wait")
        s = node.store.get(series_uid, 1)
        assert s["attempts"] == 1 and ("cannot connect" in s["reason"] or "association" in s["reason"]), s["reason"]
        assert 0.2 < s["next_attempt_at"] - s["updated_at"] <= 0.31
        _drain(node, lambda: node.store.get(series_uid, 1)["attempts"] == 2
               and node.store.get(series_uid, 1)["state"] == "retry_wait")
        s = node.store.get(series_uid, 1)
        assert 0.5 < s["next_attempt_at"] - s["updated_at"] <= 0.61  # doubled
        dest.start()
        _drain(node, lambda: node.store.get(series_uid, 1)["state"] == "delivered")
        s = node.store.get(series_uid, 1)
        v1_dir = s["result_dir"]
        assert v1_dir.endswith(os.path.join(uid_hash(study), uid_hash(series_uid), "v1"))
        assert json.load(open(os.path.join(v1_dir, "result.json")))["outputs"]["complete"] is True
        sent = {str(pydicom.dcmread(os.path.join(v1_dir, f)).SOPInstanceUID) for f in os.listdir(v1_dir)
                if f.endswith(".dcm")}
        assert sent and sent == dest.sop_uids()
        for _, _, ds in dest.received:
            assert ds.StudyInstanceUID == study

        # unchanged re-send → duplicate, not measured again
        assert send(node.scp.port, paths) == [0] * 24
        _drain(node, lambda: (node.store.get(series_uid, 2) or {}).get("state") == "duplicate")
        dup = node.store.get(series_uid, 2)  # the second receipt
        assert dup["reason"] == "same content as v1" and dup["version"] == 1
        # changed content (other pixel noise, same study and series UIDs): the third receipt is version 2
        changed = make_series(tmp_path / "b", study_uid=study, series_uid=series_uid, seed=7)
        assert send(node.scp.port, changed) == [0] * 24
        _drain(node, lambda: (node.store.get(series_uid, 3) or {}).get("state") == "delivered")
        v2 = node.store.get(series_uid, 3)
        assert v2["version"] == 2 and v2["result_dir"].endswith("v2") and os.path.isdir(v1_dir)
        new = {str(pydicom.dcmread(os.path.join(v2["result_dir"], f)).SOPInstanceUID)
               for f in os.listdir(v2["result_dir"]) if f.endswith(".dcm")}
        assert new and not (new & sent) and dest.sop_uids() == sent | new
        measured = [t for t in node.store.transitions(series_uid) if t["new"] == "measured"]
        assert [t["receipt"] for t in measured] == [1, 3]

        st = status(cfg)
        assert [(x["state"], x["version"]) for x in st["series"]] == [("delivered", 1), ("duplicate", 1),
                                                                        ("delivered", 2)]
        assert st["series"][0]["series_uid_hash"] == uid_hash(series_uid)
        text = "\n".join(r.getMessage() for r in caplog.records)
        file_log.flush()
        text += open(os.path.join(cfg.folder, "logs", "node.log")).read()
        text += json.dumps(st)
        assert uid_hash(series_uid) in text
        for value in PHI + (study, series_uid):
            assert value not in text, value
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        dest.stop()
        node.close()


def test_tls_association(tmp_path):
    certs = self_signed(tmp_path)
    node = _node(node_config(tmp_path, node={"tls": certs}))
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["certificate"])
        ctx.check_hostname = False
        assert echo(node.scp.port, tls_args=(ctx, None)) == 0x0000
        paths = make_series(tmp_path / "s", slices=2)
        assert send(node.scp.port, paths, tls_args=(ctx, None)) == [0, 0]
        assert echo(node.scp.port) is None  # a plain client gets no association
    finally:
        node.close()
    # client certificates required: a TLS client without one is refused, one with a certificate the CA signed is not
    node = _node(node_config(tmp_path, name="mtls.yaml", node={"tls": {
        **certs, "ca_certificates": certs["certificate"], "require_client_certificate": True}}))
    try:
        assert echo(node.scp.port, tls_args=(ctx, None)) is None
        ctx.load_cert_chain(certs["certificate"], certs["private_key"])
        assert echo(node.scp.port, tls_args=(ctx, None)) == 0x0000
    finally:
        node.close()


def test_partial_files_are_never_used(tmp_path):
    """A temporary file left by a kill during a C-STORE is deleted at start and never becomes an instance."""
    path = node_config(tmp_path, series={"quiet_seconds": 30})
    node = _node(path)
    paths = make_series(tmp_path / "s", slices=3)
    try:
        assert send(node.scp.port, paths[:2]) == [0, 0]
    finally:
        node.close()
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    series_dir = os.path.join(str(tmp_path / "node"), "incoming", uid_hash(uid))
    stale = os.path.join(series_dir, ".tmp-123-456-abcdef.dcm")
    with open(stale, "wb") as f:
        f.write(open(paths[2], "rb").read()[:300])  # cut short, as a kill would leave it
    node = _node(path)
    try:
        assert not os.path.exists(stale)
        s = node.store.get(uid, 1)
        assert s["state"] == "receiving" and s["instances"] == 2
        assert send(node.scp.port, paths[2:]) == [0]
        assert node.store.get(uid, 1)["instances"] == 3
    finally:
        node.close()


def test_retention_deletes_received_images(tmp_path):
    node = _node(node_config(tmp_path, storage={"keep_received_hours": 0}))
    try:
        paths = make_series(tmp_path / "mr", modality="MR")
        assert send(node.scp.port, paths) == [0] * len(paths)
        uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
        files = [r["path"] for r in node.store.instances(uid, 1)]
        assert files and all(os.path.exists(p) for p in files)
        node.worker.clock = lambda: time.time() + 1
        node.worker.complete_quiet()
        node.worker.retention()
        s = node.store.get(uid, 1)
        assert s["state"] == "filtered" and s["purged"] == 1
        assert not any(os.path.exists(p) for p in files)
        assert node.store.stored_bytes() == 0
    finally:
        node.close()


def test_status_before_start(tmp_path, capsys):
    path = node_config(tmp_path)
    assert main(["status", "--config", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["node"]["started"] is False and out["series"] == [] and out["node"]["ae_title"] == "BMD_D2"
    assert CALLER in out["node"]["allowed_callers"]
