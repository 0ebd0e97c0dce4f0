"""Command-line logging: third-party INFO off by default, on with -v; no patient data in any log line (issue 16, 7)."""
import logging
import os
import subprocess
import sys

import pydicom
import pytest

from bmd_d2.utils import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "bmd_default.yaml")
PHI = {"PatientName": "DOE^JANE^Q", "PatientID": "MRN998877", "PatientBirthDate": "19450317",
       "AccessionNumber": "ACC55555", "StudyDate": "20240229", "ReferringPhysicianName": "HOUSE^GREGORY",
       "InstitutionName": "Saint Elsewhere Hospital", "StudyID": "STUDY4711"}
PHI_STRINGS = ["DOE", "JANE", "MRN998877", "19450317", "ACC55555", "20240229", "HOUSE", "GREGORY", "Elsewhere",
               "STUDY4711", "1945-03-17"]


def _record(name, msg, *args, level=logging.INFO, exc_info=None):
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


@pytest.fixture
def clean_registry():
    logs.clear_phi()
    yield
    logs.clear_phi()


def test_filter_redacts_registered_values_everywhere(clean_registry):
    ds = pydicom.Dataset()
    for k, v in PHI.items():
        setattr(ds, k, v)
    logs.register_phi_from_dataset(ds)
    f = logs.PHIFilter()
    rec = _record("bmd_d2.reports.study", "study %s of %s born %s (%s)", "ACC55555", "DOE^JANE^Q", "19450317",
                  "Jane Doe")
    assert f.filter(rec) is True  # never dropped
    msg = rec.getMessage()
    for s in ("ACC55555", "DOE^JANE^Q", "19450317"):
        assert s not in msg
    assert msg.startswith("study <phi> of <phi> born <phi>")
    # components of a person name, and the name with spaces, are registered too
    rec = _record("highdicom.seg.sop", "copying DOE JANE Q and GREGORY")
    f.filter(rec)
    assert "DOE" not in rec.getMessage() and "GREGORY" not in rec.getMessage()
    # exception text is redacted as well
    try:
        raise ValueError("bad value MRN998877")
    except ValueError:
        rec = _record("bmd_d2.x", "failed", exc_info=sys.exc_info())
    f.filter(rec)
    assert rec.exc_info is None and "MRN998877" not in rec.exc_text and "<phi>" in rec.exc_text


def test_filter_redacts_unregistered_values_in_library_messages(clean_registry):
    f = logs.PHIFilter()
    rec = _record("py.warnings", "Invalid value for VR DA: '1951-02-30' in 'PatientBirthDate'; also 19510228")
    f.filter(rec)
    msg = rec.getMessage()
    assert "1951-02-30" not in msg and "19510228" not in msg
    assert "'PatientBirthDate'" in msg  # DICOM keywords stay readable
    # bmd_d2's own messages keep their numbers (only registered values are removed there)
    rec = _record("bmd_d2.data.dicom", "slice spacing 20240229 mm in 'x'")
    f.filter(rec)
    assert rec.getMessage() == "slice spacing 20240229 mm in 'x'"


def test_levels_quiet_default_and_verbose(clean_registry):
    logs.setup_cli_logging()
    assert logging.getLogger("highdicom.seg.sop").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("bmd_d2.measure").getEffectiveLevel() == logging.INFO
    logs.setup_cli_logging(verbosity=1)
    assert logging.getLogger("highdicom.seg.sop").getEffectiveLevel() == logging.INFO
    logs.setup_cli_logging(verbosity=2)
    assert logging.getLogger("pydicom").getEffectiveLevel() == logging.DEBUG
    logs.setup_cli_logging(quiet=True)
    assert logging.getLogger("bmd_d2.measure").getEffectiveLevel() == logging.WARNING
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_bmd_cli", False)]
    assert len(handlers) == 1 and any(isinstance(x, logs.PHIFilter) for x in handlers[0].filters)
    logs.setup_cli_logging()


@pytest.fixture(scope="module")
def phi_study(tmp_path_factory):
    """A phantom series whose headers carry patient data, one value of it malformed (pydicom warns about it)."""
    from bmd_d2.phantoms import PhantomOptions, generate_study, write_study

    root = tmp_path_factory.mktemp("phi")
    st = generate_study(5, PhantomOptions.tiny(metal=False))
    sdir = write_study(st, root / "in" / "case", preview=False)
    for name in os.listdir(sdir / "dicom"):
        p = str(sdir / "dicom" / name)
        ds = pydicom.dcmread(p)
        for k, v in PHI.items():
            setattr(ds, k, v)
        ds.add_new(0x00100030, "DA", "1945-03-17")  # PatientBirthDate, malformed: pydicom warns with the value
        ds.save_as(p)
    return sdir


@pytest.mark.parametrize("verbosity", ["", "-vv"])
def test_cli_log_has_no_phi(phi_study, tmp_path, verbosity):
    cmd = [sys.executable, "-m", "bmd_d2.cli.measure", str(phi_study), "--config-file", CFG, "-o", str(tmp_path),
           "--dicom-outputs", "MEASURE.TTA_SHIFTS", "[]", "MEASURE.TTA_SIZES", "[]"] + ([verbosity] if verbosity else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode in (0, 3), r.stderr
    log = r.stdout + r.stderr
    leaked = [s for s in PHI_STRINGS if s in log]
    assert not leaked, (leaked, log[-3000:])
    if verbosity:
        assert "highdicom" in r.stderr or "pydicom" in r.stderr  # the libraries' messages are shown
        assert "<phi>" in r.stderr or "<redacted>" in r.stderr or "<date>" in r.stderr
    else:
        assert " INFO] " not in "\n".join(x for x in r.stderr.splitlines() if "bmd_d2" not in x.split(" INFO] ")[0])
        assert not [x for x in r.stderr.splitlines() if "highdicom" in x and "INFO" in x]
