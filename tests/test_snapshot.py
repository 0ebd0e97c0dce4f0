"""The result-snapshot comparison used to prove a refactor changed nothing (tools/snapshot_results.py)."""
import json
import os
import subprocess
import sys

from bmd_d2.evaluation.snapshot import comparable, compare_folders, differences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_differences_finds_every_kind_of_change():
    a = {"vertebrae": [{"level": "L1", "trabecular_hu": 104.25, "qc_flags": ["x"]}], "patient": {"acr_bmd": 99.5}}
    assert differences(a, json.loads(json.dumps(a))) == []
    b = json.loads(json.dumps(a))
    b["vertebrae"][0]["trabecular_hu"] += 5e-7  # within 1e-6
    assert differences(a, b) == []
    b["vertebrae"][0]["trabecular_hu"] += 2e-6
    assert differences(a, b) == ["$.vertebrae[0].trabecular_hu: 104.25 != 104.2500025"]
    c = json.loads(json.dumps(a))
    c["vertebrae"][0]["qc_flags"].append("y")
    c["patient"]["acr_category"] = "osteopenia"
    assert differences(a, c) == ["$.patient.acr_category: missing on one side", "$.vertebrae[0].qc_flags: 1 != 2 items"]
    d = json.loads(json.dumps(a))
    d["vertebrae"][0]["level"] = "L2"
    assert differences(a, d) == ["$.vertebrae[0].level: 'L1' != 'L2'"]
    assert differences({"x": True}, {"x": 1}) == ["$.x: True != 1"]
    assert differences({"x": None}, {"x": 0.0}) == ["$.x: None != 0.0"]


def test_comparable_drops_only_the_input_path():
    r = {"study": {"source": "/tmp/a", "SeriesInstanceUID": "1.2"}, "vertebrae": []}
    assert comparable(r) == {"study": {"SeriesInstanceUID": "1.2"}, "vertebrae": []}
    assert r["study"]["source"] == "/tmp/a"  # the input is not modified


def test_compare_folders(tmp_path):
    ref, cur = tmp_path / "ref", tmp_path / "cur"
    ref.mkdir()
    cur.mkdir()
    (ref / "a.json").write_text(json.dumps({"v": [1.0, 2.0]}))
    (cur / "a.json").write_text(json.dumps({"v": [1.0, 2.0]}))
    (cur / "b.json").write_text(json.dumps({"v": []}))
    assert compare_folders(str(ref), str(cur), ["a"]) == []
    (cur / "a.json").write_text(json.dumps({"v": [1.0, 2.1]}))
    assert compare_folders(str(ref), str(cur), ["a", "b"]) == ["a $.v[1]: 2.0 != 2.1", f"b: not in {ref}"]


def test_tool_help():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "snapshot_results.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--compare" in r.stdout
