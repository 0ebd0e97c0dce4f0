"""End to end with the quick config and random-init weights: API, CLI outputs, batch resume and failure isolation.

Random weights may detect nothing: these tests assert structure, consistency and flags, not values.
"""
import csv
import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from bmd_d2 import BMDError
from bmd_d2.config import get_bmd_cfg
from bmd_d2.phantoms import PhantomOptions, generate_study, write_study
from bmd_d2.measure import BMDStudyPredictor, StudyResult
from bmd_d2 import reports
from bmd_d2.utils.files import atomic_path, atomic_write_text, sanitize_study_id, study_id_from_path
from bmd_d2.engine.batch import discover_studies, run_batch, safe_study_dir
from bmd_d2.cli.measure import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    for i, seed in enumerate((3, 5)):
        st = generate_study(seed, PhantomOptions.tiny(metal=False, fracture=False), study_id=f"ph{i}")
        write_study(st, root / "studies" / st.study_id, preview=False)
    bad = root / "studies" / "broken"
    bad.mkdir()
    (bad / "IM0001.dcm").write_bytes(b"DICM-not-really" * 10)
    return root


def _cfg(**kw):
    opts = ["INPUT.DICOM.CACHE_DIR", "", "INPUT.DICOM.IMAGE_SIZE", "256"]  # small image: fast on 2 CPU cores
    for k, v in kw.items():
        opts += [k, v]
    return get_bmd_cfg(QUICK, opts)


def test_predictor_api_structure(studies):
    torch.manual_seed(0)
    cfg = _cfg(**{"MEASURE.SCORE_THRESHOLD": "0.0"})  # random weights: keep whatever is detected
    pred = BMDStudyPredictor(cfg)
    res = pred(str(studies / "studies" / "ph0" / "dicom"))
    assert isinstance(res, StudyResult) and res.study_id == "ph0"
    d = res.to_dict()
    json.dumps(d, allow_nan=False)  # serialisable, no NaN
    assert d["study"]["Modality"] == "CT" and d["study"]["StudyInstanceUID"]
    assert "PatientName" not in json.dumps(d) and "SOPInstanceUIDs" not in d["study"]
    for v in res.vertebrae:
        assert v.mask.shape == res.sagittal.hu.shape[1:] and v.score >= 0
        assert v.level is None or v.level in ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
        assert len(v.centroid_lps) == 3
    assert set(res.patient) >= {"acr_bmd", "acr_category", "l1_hu", "hu_category", "acr_levels"}
    for r in res.rejected:
        assert r["reason"]


def test_predictor_feeds_the_model_like_the_mapper(studies, tmp_path):
    """The tensor the predictor's test-time wrapper hands the model equals the test mapper's tensor for the same
    series."""
    from bmd_d2.data.mapper import BMDDatasetMapper

    cfg = _cfg(**{"INPUT.DICOM.CACHE_DIR": str(tmp_path)})
    pred = BMDStudyPredictor(cfg)
    seen = {}
    real = pred.model.inference

    def spy(batched, *args, **kwargs):
        seen["image"] = batched[0]["image"].clone()
        return real(batched, *args, **kwargs)

    pred.model.inference = spy
    src = str(studies / "studies" / "ph0" / "dicom")
    pred(src)
    mapped = BMDDatasetMapper(cfg, is_train=False)({"series_dir": src, "image_id": 0})
    assert seen["image"].shape == mapped["image"].shape
    assert torch.equal(seen["image"].float(), mapped["image"].float())


def test_cli_single_study_outputs_parse_and_match(studies, tmp_path, capsys):
    out = tmp_path / "out"
    src = str(studies / "studies" / "ph1" / "dicom")
    args = [src, "--config-file", QUICK, "-o", str(out), "--json", "--masks", "-q", "MEASURE.SCORE_THRESHOLD", "0.0",
            "INPUT.DICOM.IMAGE_SIZE", "256"]
    torch.manual_seed(0)
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    sdir = out / "ph1"
    saved = json.loads((sdir / "result.json").read_text())
    assert printed == saved and saved["study_id"] == "ph1"
    rows = list(csv.DictReader(io.StringIO((sdir / "vertebrae.csv").read_text())))
    assert list(rows[0].keys()) == reports.VERTEBRA_COLUMNS if rows else True
    assert [r["level"] or None for r in rows] == [v["level"] for v in saved["vertebrae"]]
    for r, v in zip(rows, saved["vertebrae"]):
        assert float(r["score"]) == pytest.approx(v["score"], rel=1e-5)
        assert r["qc_flags"] == ";".join(v["qc_flags"])
    assert (sdir / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    import nibabel as nib

    lab = nib.load(str(sdir / "masks.nii.gz"))
    assert lab.shape == tuple(nib.load(str(studies / "studies" / "ph1" / "labels.nii.gz")).shape)
    # the API with the same seed gives the same numbers
    torch.manual_seed(0)
    api = BMDStudyPredictor(_cfg(**{"MEASURE.SCORE_THRESHOLD": "0.0"}))(src, study_id="ph1").to_dict()
    assert api["vertebrae"] == saved["vertebrae"] and api["patient"] == saved["patient"]


def test_cli_batch_isolates_failures_and_resumes(studies, tmp_path, capsys):
    out = tmp_path / "batch"
    args = [str(studies), "--config-file", QUICK, "-o", str(out), "-q", "--workers", "1", "INPUT.DICOM.IMAGE_SIZE",
            "256"]
    assert main(args) == 1  # one broken study
    text = capsys.readouterr().out
    assert "2 measured (2 this run, 0 already done)" in text and "1 failed" in text
    fails = list(csv.DictReader(open(out / "failures.csv")))
    assert [f["study_id"] for f in fails] == ["broken"] and fails[0]["reason"]
    assert "\n" not in fails[0]["reason"]
    assert {r["study_id"]: r["status"] for r in csv.DictReader(open(out / "studies.csv"))} == {
        "broken": "failed", "ph0": "ok", "ph1": "ok"}
    assert json.loads((out / "summary.json").read_text())["failed"] == 1
    mtime = os.path.getmtime(out / "ph0" / "result.json")
    assert main(args) == 1
    assert "3 studies: 2 measured (0 this run, 2 already done), 1 failed" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["measured"], summary["failed"], summary["this_run"]["skipped"]) == (2, 1, 2)
    assert os.path.getmtime(out / "ph0" / "result.json") == mtime
    assert not [p for p in os.listdir(out / "ph0") if ".tmp" in p]  # no temp files left


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--config-file", QUICK, "-o", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path), "--config-file", QUICK, "--weights", str(tmp_path / "w.pth")]) == 2
    cal = tmp_path / "cal.json"
    cal.write_text("{}")
    assert main([str(tmp_path), "--config-file", QUICK, "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3 and "Traceback" not in err


def test_study_ids_cannot_escape(tmp_path):
    for name in ("../../etc/passwd", "..", "a/b\\c", "", ".hidden", "x" * 300, "Müller, Hans^2"):
        sid = sanitize_study_id(name)
        assert sid and "/" not in sid and not sid.startswith(".") and len(sid) <= 80
        assert os.path.dirname(safe_study_dir(str(tmp_path), sid)) == os.path.realpath(tmp_path)
    with pytest.raises(BMDError):
        safe_study_dir(str(tmp_path), "../x")
    assert study_id_from_path("/data/studies/abc/dicom") == "abc"
    assert study_id_from_path("/data/ct 1.nii.gz") == "ct_1"


def test_discovery_and_sharding(tmp_path):
    for n in ("b", "a", ".hidden", "a "):  # "a " sanitises to "a": made unique
        (tmp_path / n).mkdir()
        (tmp_path / n / "x.dcm").write_bytes(b"")
    (tmp_path / "c.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    found = discover_studies(str(tmp_path))
    assert [s for s, _ in found] == ["a", "a-2", "b", "c"]
    seen = []

    def fake(src, sid):
        seen.append(sid)
        raise RuntimeError("boom\nsecond line")

    out = tmp_path / "o"
    s0 = run_batch(fake, found, str(out), rank=0, world_size=2, progress=False)
    s1 = run_batch(fake, found, str(out), rank=1, world_size=2, progress=False)
    assert sorted(seen) == ["a", "a-2", "b", "c"]
    assert [o.study_id for o in s0.outcomes] == ["a", "b"] and [o.study_id for o in s1.outcomes] == ["a-2", "c"]
    assert all(o.status == "failed" and o.reason == "RuntimeError: boom second line" for o in s0.outcomes)


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_text(str(p), "old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(p)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
