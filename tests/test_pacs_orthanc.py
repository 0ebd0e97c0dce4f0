"""A real PACS round trip: Orthanc (Debian package ``orthanc``) ⇄ bmd-serve, on loopback ports.

The session's node (the shipped default model, one model load, :class:`_orthanc.Lab`) and one Orthanc serve the
module. The example study (the demo phantom) is uploaded to Orthanc; Orthanc's Lua routing of docs/pacs.md
(``OnStableSeries`` → ``SendToModality``) forwards the CT series to the node, which measures it and sends SEG, SR and
SC back to the caller. The tests check that the three objects arrive in the same Orthanc study, parse, and carry the
values of the node's result.json; that a re-send of the unchanged series from Orthanc's REST API
(``POST /modalities/{name}/store``) is not measured again; and that the returned objects are not routed back to the
node. Skipped without Orthanc, except under CI (then failed).
"""
import json
import os
import re
import sys
import time
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _orthanc as pacs  # noqa: E402

ROUND_TRIP_TIMEOUT_S = 300
ROOT = Path(pacs.ROOT)

@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The session's node and its peers (shared with the other real-client test module)."""
    yield from pacs.shared_lab(tmp_path_factory)


@pytest.fixture(scope="module")
def example(lab, tmp_path_factory):
    """The example series' files, written while the node loads its model."""
    pacs.require_binary("Orthanc")  # skip (or fail under CI) before anything is started
    lab.launch_node()
    return pacs.example_series(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def peers(lab, example):
    """(orthanc, node), both started."""
    return lab.started_orthanc(), lab.started_node()


@pytest.fixture(scope="module")
def delivered(peers, example):
    """The example study uploaded to Orthanc, routed to the node, measured and its outputs back in Orthanc."""
    orthanc, node = peers
    files = example
    source = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    ids = orthanc.upload(files)
    (row,) = node.wait_state(source.SeriesInstanceUID, "delivered", 1, timeout=ROUND_TRIP_TIMEOUT_S)
    wanted = set(pacs.OUTPUT_CLASSES.values())
    by_class = pacs.wait_for("SEG, SR and SC in the Orthanc study",
                             lambda: (lambda got: got if wanted <= set(got) else None)(
                                 orthanc.series_by_class(ids["study"])), 30, log=node.log)
    result = json.loads((Path(row["result_dir"]) / "result.json").read_text())
    return {"ids": ids, "row": row, "by_class": by_class, "result": result, "source": source, "files": files}


def _download(orthanc, by_class, sop_class, tmp_path):
    (instance,) = by_class[sop_class]
    path = tmp_path / f"{instance}.dcm"
    path.write_bytes(orthanc.instance_file(instance))
    return path, pydicom.dcmread(str(path))


def test_orthanc_echoes_the_node(peers):
    orthanc, _ = peers
    assert orthanc.echo("BMD"), "C-ECHO from Orthanc to bmd-serve failed"


def test_outputs_arrive_in_the_same_study(delivered, peers, tmp_path):
    orthanc, _ = peers
    src = delivered["source"]
    for kind, sop_class in pacs.OUTPUT_CLASSES.items():
        _, ds = _download(orthanc, delivered["by_class"], sop_class, tmp_path)
        assert ds.SOPClassUID == sop_class, kind
        assert ds.StudyInstanceUID == src.StudyInstanceUID, kind
        assert ds.PatientID == src.PatientID, kind
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID, kind
    series = orthanc.study_series(delivered["ids"]["study"])
    assert len(series) == 4, [s["MainDicomTags"] for s in series]  # the CT + SEG + SR + SC, nothing else
    row = delivered["row"]
    assert row["version"] == 1 and row["instances"] == len(delivered["files"]) and row["attempts"] >= 1
    printed = {r["series_uid_hash"]: r for r in peers[1].status(cli=True)["series"]}  # the command itself
    assert printed[row["series_uid_hash"]]["state"] == "delivered"
    assert printed[row["series_uid_hash"]]["study_uid_hash"] == pacs.uid_hash(src.StudyInstanceUID)


def test_sr_carries_the_measured_values(delivered, peers, tmp_path):
    import highdicom as hd
    from bmd_d2.reports import dicom as do

    orthanc, _ = peers
    path, _ = _download(orthanc, delivered["by_class"], pacs.SR_CLASS, tmp_path)
    saved = delivered["result"]
    sr = hd.sr.srread(str(path))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(saved["vertebrae"]) > 0
    bmd_name = do._private("bmd", "Trabecular BMD, reported")
    by_level = {}
    for g, v in zip(groups, saved["vertebrae"]):
        assert g.finding_sites[0].value == do.level_code(v["level"])
        values = [m.value for m in g.get_measurements(name=bmd_name)]
        if v["bmd"] is not None:
            assert values == [pytest.approx(v["bmd"], abs=1e-3)], v["level"]
        by_level[v["level"]] = values
    assert by_level.get("L1"), f"no L1 BMD in the SR: {by_level}"
    (pg,) = sr.content.get_image_measurement_groups()
    acr = pg.get_measurements(name=do._private("acr-bmd", "ACR QCT patient BMD, mean of two lumbar vertebrae"))
    assert saved["patient"]["acr_bmd"] is not None
    assert [m.value for m in acr] == [pytest.approx(saved["patient"]["acr_bmd"], abs=1e-3)]


def test_seg_has_one_segment_per_vertebra(delivered, peers, tmp_path):
    from bmd_d2.reports import dicom as do

    orthanc, _ = peers
    _, seg = _download(orthanc, delivered["by_class"], pacs.SEG_CLASS, tmp_path)
    levels = [v["level"] for v in delivered["result"]["vertebrae"]]
    assert len(seg.SegmentSequence) == len(levels) > 0
    for item, level in zip(seg.SegmentSequence, levels):
        assert item.SegmentLabel.startswith(level), (item.SegmentLabel, level)
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == do.level_code(level).value
    assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == {delivered["source"].SeriesInstanceUID}


def test_sc_is_the_report_picture(delivered, peers, tmp_path):
    orthanc, _ = peers
    _, sc = _download(orthanc, delivered["by_class"], pacs.SC_CLASS, tmp_path)
    assert sc.SamplesPerPixel == 3 and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.pixel_array.std() > 0


def test_resent_unchanged_series_is_a_duplicate(delivered, peers):
    orthanc, node = peers
    study, series_uid = delivered["ids"]["study"], delivered["source"].SeriesInstanceUID
    before = {k: len(v) for k, v in orthanc.series_by_class(study).items()}
    orthanc.send("BMD", [delivered["ids"]["series"]])  # Orthanc's REST API: C-STORE the series again
    node.wait_state(series_uid, "duplicate", 1, timeout=60)
    rows = node.series_of(series_uid)
    assert [r["state"] for r in rows].count("delivered") == 1, rows
    assert all(r["state"] in ("delivered", "duplicate") for r in rows), rows
    assert {k: len(v) for k, v in orthanc.series_by_class(study).items()} == before


def test_returned_objects_are_not_routed_back(delivered, peers):
    orthanc, node = peers
    # the Lua routing forwards CT series only: SEG/SR/SC, once stable in Orthanc, never reach the node
    pacs.wait_for("every series of the study stable in Orthanc",
                  lambda: all(s["IsStable"] for s in orthanc.study_series(delivered["ids"]["study"])), 30)
    time.sleep(3)  # what OnStableSeries would have sent has had time to arrive
    study_hash = pacs.uid_hash(delivered["source"].StudyInstanceUID)
    series = {r["series_uid_hash"] for r in node.series() if r["study_uid_hash"] == study_hash}
    assert series == {pacs.uid_hash(delivered["source"].SeriesInstanceUID)}, node.series()


def test_documented_node_config_is_valid(tmp_path):
    """The node configuration of docs/pacs.md "Connecting a PACS" passes ``bmd-serve check``'s validation."""
    from bmd_d2.serve.config import load_node_config

    text = (ROOT / "docs" / "pacs.md").read_text()
    section = text[text.index("## Connecting a PACS"):]
    m = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert m, "no yaml block in docs/pacs.md, Connecting a PACS"
    path = tmp_path / "node.yaml"
    path.write_text(m.group(1).replace("/var/lib/bmd_d2/node", str(tmp_path / "node")))
    cfg = load_node_config(str(path))
    assert cfg.node.allowed_callers == ("ORTHANC",) and cfg.destination.ae_title == "sender"
    assert cfg.callers["ORTHANC"].port == 4242
