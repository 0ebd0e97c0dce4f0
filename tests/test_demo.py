"""tools/demo.py: the bundled example study is written once and rewritten when the phantom generator changed."""
import importlib.util
import json
import os

from bmd_d2.phantoms import GENERATOR_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "tools", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_kept_while_current_and_rewritten_after_a_generator_change(tmp_path):
    demo = _demo()
    dicom_dir = demo.make_example(str(tmp_path))
    meta = tmp_path / "studies" / "example_0001" / "phantom.json"
    rec = json.loads(meta.read_text())
    assert rec["generator_version"] == GENERATOR_VERSION and len(os.listdir(dicom_dir)) > 100
    first = os.path.join(dicom_dir, sorted(os.listdir(dicom_dir))[0])
    os.utime(first, (1, 1))
    assert demo.make_example(str(tmp_path)) == dicom_dir and os.path.getmtime(first) == 1  # current: kept
    rec["generator_version"] = GENERATOR_VERSION - 1
    meta.write_text(json.dumps(rec))
    stale = os.path.join(dicom_dir, "from_an_older_example.dcm")
    with open(stale, "wb") as f:
        f.write(b"old slice")
    demo.make_example(str(tmp_path))  # written by an older generator: rewritten, nothing of it left
    assert not os.path.exists(stale)
    assert json.loads(meta.read_text())["generator_version"] == GENERATOR_VERSION
    assert os.path.getmtime(first) > 1
