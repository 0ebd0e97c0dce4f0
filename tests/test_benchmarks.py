"""Benchmarks: matching and precision on hand-made examples, ground-truth masks through the measuring chain, and both
tools end to end on tiny phantoms with the quick config and random weights (structure, not values)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from bmd_d2.evaluation import metrics
from bmd_d2.evaluation.study_accuracy import (METHODS, precision_detail, rescan_groups, study_record,
                                              summarize_precision, summarize_studies, truth_acr,
                                              truth_masks_on_sagittal)
from bmd_d2.measure.result import StudyResult, VertebraResult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the tools' command lines (tools end to end, below)


# ------------------------------------------------------------------------------------------------ hand-made examples
def test_precision_rms_hand_computed():
    # SDs: [100, 102] -> sqrt(2); [50, 50, 53] -> sqrt(3); RMS-SD = sqrt((2 + 3) / 2)
    r = metrics.precision_rms([[100, 102], [50, 50, 53], [7.0], [None, 5.0]])
    assert r["n_subjects"] == 2 and r["n_measurements"] == 5 and r["dof"] == 3
    assert r["rms_sd"] == pytest.approx(math.sqrt(2.5))
    cv = math.sqrt(((math.sqrt(2) / 101) ** 2 + (math.sqrt(3) / 51) ** 2) / 2) * 100
    assert r["rms_cv_pct"] == pytest.approx(cv)
    assert metrics.mask_iou_matrix(np.zeros((0, 4, 4), bool), np.ones((2, 4, 4), bool)).shape == (0, 2)
    empty = metrics.precision_rms([[1.0], []])
    assert empty["n_subjects"] == 0 and math.isnan(empty["rms_sd"]) and math.isnan(empty["rms_cv_pct"])


def _box(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


A, B = 10.0, 1.2  # phantom calibration HU = A + B * BMD
TRUTH = [{"level": "L1", "bmd_mg_cm3": 100.0}, {"level": "L2", "bmd_mg_cm3": 140.0},
         {"level": "L3", "bmd_mg_cm3": 90.0}, {"level": "S1", "bmd_mg_cm3": 120.0}]
GT = {"L1": _box(64, 64, 5, 15, 10, 30), "L2": _box(64, 64, 20, 30, 10, 30), "L3": _box(64, 64, 35, 45, 10, 30),
      "S1": _box(64, 64, 50, 60, 10, 30)}


def _vert(level, mask, bmd, cls=0, hu_offset=0.0):
    hu = A + B * bmd + hu_offset
    return VertebraResult(level=level, category_id=cls, score=0.9, box_xyxy=[0, 0, 1, 1], mask=mask,
                          learned_bmd=bmd, trabecular_hu=hu, trabecular_hu_3d=hu, classical_bmd=hu,
                          classical_bmd_3d=hu)


def _result(verts, acr_levels=("L1", "L2")):
    res = StudyResult(study_id="s", vertebrae=verts)
    res.patient = {"acr_category_learned": "normal", "acr_category_classical": "normal",
                   "acr_levels_classical": list(acr_levels)}
    return res


def test_study_record_perfect_prediction():
    """Predicted = truth masks and values: Dice 1, MAE 0 (learned and true-calibration classical), all levels right."""
    verts = [_vert(t["level"], GT[t["level"]], t["bmd_mg_cm3"], cls=int(t["level"] == "S1")) for t in TRUTH]
    rec = study_record(_result(verts), TRUTH, GT, A, B)
    assert rec["n_gt"] == 4 and rec["n_pred"] == 4 and len(rec["pairs"]) == 4
    s = summarize_studies([rec])
    assert s["detection"]["recall"] == 1.0 and s["detection"]["precision"] == 1.0
    assert s["dice"]["mean"] == 1.0 and s["dice"]["vertebrae_mean"] == 1.0 and s["dice"]["mean_including_missed"] == 1
    assert s["levels"]["accuracy"] == 1.0 and s["levels"]["studies_all_correct"] == 1.0
    for m in ("learned", "classical_true_cal", "classical_3d_true_cal"):
        v = s["bmd"][m]["vertebrae"]
        assert v["n"] == 3 and v["mae"] == pytest.approx(0.0, abs=1e-9) and v["pearson_r"] == pytest.approx(1.0)
        assert s["bmd"][m]["per_level"]["S1"]["mae"] == pytest.approx(0.0, abs=1e-9)
        assert s["bmd_by_label"][m]["mae"] == pytest.approx(0.0, abs=1e-9)
    # the configured (here: raw HU) calibration: classical = A + B*bmd, so the error is A + (B - 1) * bmd
    exp = np.mean([A + (B - 1) * t["bmd_mg_cm3"] for t in TRUTH[:3]])
    assert s["bmd"]["classical"]["vertebrae"]["mae"] == pytest.approx(exp)
    # patient ACR: truth mean(L1, L2) = 120 -> osteopenia; learned said normal; true-cal classical gives osteopenia
    assert truth_acr({t["level"]: t["bmd_mg_cm3"] for t in TRUTH}) == {"levels": ["L1", "L2"], "bmd": 120.0,
                                                                         "category": "osteopenia"}
    assert s["acr"]["learned"]["accuracy"] == 0.0 and s["acr"]["classical_true_cal"]["accuracy"] == 1.0


def test_study_record_errors_counted():
    """A missed vertebra, a wrong label, a partial overlap, a false positive and one on an ignored level."""
    h = np.zeros((64, 64), bool)
    shifted = _box(64, 64, 7, 17, 10, 30)  # L1 moved 2 rows: IoU 8/12
    ignored_mask = _box(64, 64, 0, 3, 10, 30)
    verts = [_vert("L1", shifted, 110.0), _vert("L3", GT["L2"], 140.0),  # L2 labelled L3
             _vert(None, _box(64, 64, 5, 15, 40, 60), 50.0),          # false positive (no truth there)
             _vert("T12", ignored_mask, 80.0)]                         # on a labelled level that does not count
    gt = {k: GT[k] for k in ("L1", "L2", "L3")}
    rec = study_record(_result(verts), TRUTH[:3], gt, A, B, ignore_masks={"T12": ignored_mask})
    assert rec["n_ignored"] == 1 and rec["n_pred"] == 3 and len(rec["pairs"]) == 2
    s = summarize_studies([rec])
    assert s["detection"]["recall"] == pytest.approx(2 / 3) and s["detection"]["precision"] == pytest.approx(2 / 3)
    assert s["dice"]["mean"] == pytest.approx((2 * 160 / 400 + 1.0) / 2)
    assert s["dice"]["mean_including_missed"] == pytest.approx((2 * 160 / 400 + 1.0) / 3)
    assert s["levels"]["accuracy"] == 0.5 and s["levels"]["studies_all_correct"] == 0.0
    assert s["bmd"]["learned"]["per_level"]["L1"]["mae"] == pytest.approx(10.0)
    assert s["bmd"]["learned"]["per_level"]["L2"]["mae"] == pytest.approx(0.0)
    # by label: the vertebra called L3 (true L2, 140) is compared with L3's truth (90); no vertebra called L2
    lab = s["bmd_by_label"]["learned"]
    assert lab["n"] == 2 and lab["n_missing"] == 1 and lab["mae"] == pytest.approx((10 + 50) / 2)


def test_rescan_groups_and_precision():
    scans = []
    for vals in ((100.0, 150.0), (102.0, 150.0), (101.0, None)):
        verts = [_vert("L1", GT["L1"], vals[0])]
        if vals[1] is not None:
            verts.append(_vert("L2", GT["L2"], vals[1]))
        scans.append(study_record(_result(verts), TRUTH, {k: GT[k] for k in ("L1", "L2")}, A, B))
    assert rescan_groups(scans, "learned") == [[100.0, 102.0, 101.0], [150.0, 150.0, None]]
    p = summarize_precision([scans])
    assert p["patients"] == 1 and p["scans_per_patient"] == [3]
    assert p["learned"]["n_subjects"] == 2 and p["learned"]["rms_sd"] == pytest.approx(math.sqrt(1.0 / 2))
    # Glüer's RMS-CV pools each subject's SD/mean; CV-RMSSD divides the pooled RMS-SD by the subjects' mean BMD
    assert p["learned"]["rms_cv_pct"] == pytest.approx(100 * math.sqrt((1.0 / 101.0) ** 2 / 2))
    assert p["learned"]["cv_rmssd_pct"] == pytest.approx(100 * math.sqrt(1.0 / 2) / 125.5)
    assert set(METHODS) <= set(p)
    detail = precision_detail([scans])
    assert [(d["level"], d["values"]["learned"]) for d in detail] == [("L1", [100.0, 102.0, 101.0]),
                                                                      ("L2", [150.0, 150.0, None])]
    assert detail[0]["gt_bmd"] == pytest.approx(100.0) and detail[0]["study_id"] == scans[0]["study_id"]


# ------------------------------------------------------------------------------------------ phantom, truth masks
def test_truth_masks_through_measuring_chain():
    """Ground-truth masks of a phantom as detections: Dice 1, every level right, learned MAE 0, classical close."""
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.data.dicom import Volume
    from bmd_d2.levels import LEVELS, SACRUM_CLASS
    from bmd_d2.phantoms import PhantomOptions, generate_study
    from bmd_d2.measure.predictor import measure_detections, sagittal_from_cfg

    st = generate_study(9000, PhantomOptions.tiny(metal=False, fracture=False))
    cfg = get_bmd_cfg(QUICK, ["INPUT.DICOM.IMAGE_SIZE", "256"])
    vol = Volume(st.quantized_hu(), st.affine.copy(), meta={"source": "phantom"})
    sag = sagittal_from_cfg(vol, cfg)
    listed = [t["level"] for t in st.truth]
    gt = truth_masks_on_sagittal(sag, st.labels, st.affine, listed)
    assert list(gt) == [lv for lv in LEVELS if lv in gt] and {"L1", "L2", "L3", "L4", "S1"} <= set(gt)
    from bmd_d2.evaluation.study_accuracy import reference_bmd

    truth = {t["level"]: reference_bmd(t) for t in st.truth}
    masks = np.stack(list(gt.values()))
    boxes = [[c.min(), r.min(), c.max() + 1, r.max() + 1] for r, c in (np.nonzero(m) for m in masks)]
    dets = {"boxes": np.array(boxes, float), "scores": np.full(len(gt), 0.99),
            "classes": np.array([SACRUM_CLASS if lv == "S1" else 0 for lv in gt]), "masks": masks,
            "bmd": np.array([truth[lv] for lv in gt])}
    res = measure_detections(dets, sag, cfg, volume=vol, study_id="gt")
    rec = study_record(res, st.truth, gt, st.params["calib_a"], st.params["calib_b"])
    s = summarize_studies([rec])
    assert s["detection"]["recall"] == 1.0 and s["detection"]["precision"] == 1.0
    assert s["dice"]["mean"] == pytest.approx(1.0) and s["levels"]["accuracy"] == 1.0
    assert s["bmd"]["learned"]["all"]["mae"] == pytest.approx(0.0, abs=1e-3)
    # sagittal ROI of a noisy 2 mm / 3 mm phantom through the true calibration: a few mg/cm³ (classical physics)
    assert s["bmd"]["classical_true_cal"]["vertebrae"]["mae"] < 15.0


# ---------------------------------------------------------------------------------------------- tools end to end
def _finite_or_none(x):
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


def test_benchmark_speed_cli_tiny(tmp_path, capsys):
    import benchmark

    out = tmp_path / "speed.json"
    torch.manual_seed(0)
    rc = benchmark.main(["--config-file", QUICK, "--phantom", "tiny", "--studies", "1", "--io-slices", "4",
                         "--io-size", "32", "--repeat", "1", "--infer-iters", "1", "--train-iters", "1",
                         "--train-studies", "1", "--train-warmup", "0", "--render", "inline", "--output", str(out),
                         "-q", "INPUT.DICOM.IMAGE_SIZE", "256", "SOLVER.IMS_PER_BATCH", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Series load" in text and "End to end" in text and "random-init" in text and "Level anchors" in text
    rep = json.loads(out.read_text())
    assert rep["random_init"] is True and rep["machine"]["usable_cores"] >= 1 and rep["machine"]["torch"]
    assert rep["io"]["identical_hu"] is True and rep["io"]["bmd_d2_load_series_s"] > 0
    e = rep["e2e"]
    assert e["n"] == 1 and e["p50_s"] > 0 and e["p95_s"] >= e["p50_s"] and set(e["split_p50_s"]) == {
        "load", "sagittal", "model", "measure"}
    assert isinstance(e["meets_target_p50"], bool) and (e["target_p50_s"], e["target_p95_s"]) == (1.0, 1.5)
    # the anchors' time is a part of the study's measure time, one figure per study, against issue 18's 0.3 s
    assert len(e["per_study_anchors_s"]) == 1 and 0 <= e["anchors_max_s"] <= e["per_study_s"][0]
    assert e["anchors_p50_s"] == e["per_study_anchors_s"][0] and e["target_anchors_s"] == 0.3
    assert e["meets_target_anchors"] is (e["anchors_max_s"] <= 0.3) and e["anchors_steps"]
    assert rep["infer"]["images_per_s"] > 0 and rep["train"]["images_per_s"] > 0
    assert set(rep["memory"]) == {"io", "e2e", "infer", "train"}
    assert all(v["peak_rss_mb"] > 0 for v in rep["memory"].values())


def test_benchmark_speed_bad_input(tmp_path, capsys):
    import benchmark

    assert benchmark.main(["--config-file", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "x.json")]) == 2
    assert benchmark.main(["--config-file", QUICK, "--skip", "nope", "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err


def test_benchmark_accuracy_cli_tiny(tmp_path, capsys):
    import benchmark_accuracy

    out = tmp_path / "acc" / "accuracy.json"
    torch.manual_seed(0)
    rc = benchmark_accuracy.main(["--config-file", QUICK, "--phantom", "tiny", "--n", "1", "--rescan-patients", "1",
                                  "--rescans", "1", "--phantom-option", "slice_thickness=2.0", "--output", str(out),
                                  "-q", "INPUT.DICOM.IMAGE_SIZE", "256"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Targets" in text and "Re-scan precision" in text and "classical_true_cal" in text
    rep = json.loads(out.read_text())
    for k in ("benchmark", "machine", "random_init", "seed", "study_seeds", "calibration", "detection", "dice",
              "levels", "bmd", "bmd_by_label", "acr", "precision", "targets", "studies_detail", "pairs", "plots"):
        assert k in rep, k
    assert rep["random_init"] is True and rep["studies"] == 1 and rep["study_seeds"][0] != 9000
    assert "rod line" in rep["calibration"]["note"] and rep["calibration"]["configured"]["method"] == "internal"
    assert {"mae_classical_3d", "mae_learned", "acr_classical_3d", "rescan_cv_classical_3d",
            "mae_classical_3d_true_cal"} <= set(rep["targets"])
    assert set(rep["acr"]) == {"learned", "classical", "learned_true_cal", "classical_true_cal", "classical_3d",
                               "classical_3d_true_cal"}
    assert rep["detection"]["gt"] >= 5 and _finite_or_none(rep["detection"]["precision"])
    for m in METHODS:
        for k in ("mae", "rmse", "bias", "pearson_r", "loa_low", "loa_high"):
            assert _finite_or_none(rep["bmd"][m]["vertebrae"][k])
        assert _finite_or_none(rep["precision"][m]["rms_sd"])
    for t in rep["targets"].values():
        assert t["met"] in (True, False, None) and _finite_or_none(t["value"])
    if rep["detection"]["matched"] == 0:  # random weights usually detect nothing at score 0.5
        assert rep["dice"]["vertebrae_mean"] is None and rep["targets"]["dice_vertebrae"]["met"] is None
    assert rep["precision"]["scans_per_patient"] == [2]
    # --phantom-option fixes the field for every study (the tiny preset draws 1.5-3 mm otherwise)
    assert rep["phantom_options"] == {"slice_thickness": 2.0}
    assert [d["slice_thickness"] for d in rep["studies_detail"]] == [2.0]
    for paths in rep["plots"].values():
        assert all(os.path.isfile(p) for p in paths)


def test_benchmark_accuracy_bad_phantom_option(tmp_path, capsys):
    import benchmark_accuracy

    for item, msg in (("pixel_size=3", "expected KEY=VALUE with KEY a PhantomOptions field"),
                      ("slice_thickness", "expected KEY=VALUE"), ("rescan_seed=1", "PhantomOptions field"),
                      ("slice_thickness=thick", "the value is not a Python literal")):
        rc = benchmark_accuracy.main(["--config-file", QUICK, "--phantom", "tiny", "--n", "1", "--phantom-option", item,
                                      "--output", str(tmp_path / "a.json"), "-q"])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --phantom-option") and msg in lines[0], err
    assert not (tmp_path / "a.json").exists()


def test_true_calibration_follows_withheld_values():
    """A vertebra whose classical BMD the measurement withheld (metal, implausible HU) gets none by any calibration."""
    from types import SimpleNamespace

    from bmd_d2.evaluation.study_accuracy import vertebra_values

    metal = SimpleNamespace(learned_bmd=30.0, classical_bmd=None, classical_bmd_3d=None, trabecular_hu=600.0,
                            trabecular_hu_3d=800.0, qc_flags=["metal"])
    vals = vertebra_values(metal, 1.0, 20.0)
    assert vals["classical_true_cal"] is None and vals["classical_3d_true_cal"] is None and vals["learned"] == 30.0
    ok = SimpleNamespace(learned_bmd=100.0, classical_bmd=110.0, classical_bmd_3d=None, trabecular_hu=120.0,
                         trabecular_hu_3d=None, qc_flags=[])
    vals = vertebra_values(ok, 0.8, 20.0)
    assert vals["classical_true_cal"] == pytest.approx(125.0) and vals["classical_3d_true_cal"] is None


def test_calibration_blind_floor_measures_the_calibration_spread():
    from bmd_d2.evaluation import benchmark_accuracy

    rng = np.random.default_rng(0)

    def studies(a_range, b_range):
        out = []
        for _ in range(8):
            a, b = rng.uniform(*a_range), rng.uniform(*b_range)
            bmd = rng.uniform(30, 250, 6)
            out.append([{"level": lv, "bmd_mg_cm3": x, "trabecular_hu": a + b * x}
                        for lv, x in zip(["T12", "L1", "L2", "L3", "L4", "L5"], bmd)])
        return out

    same = benchmark_accuracy.calibration_blind_floor(studies((10, 10), (1.1, 1.1)))
    assert same["n"] == 48 and same["mae"] < 1e-6  # one calibration: HU determines BMD exactly
    spread = benchmark_accuracy.calibration_blind_floor(studies((-10, 30), (0.8, 1.25)))
    assert 5 < spread["mae"] < 40 and spread["pearson_r"] < 0.99
    assert np.isnan(benchmark_accuracy.calibration_blind_floor(studies((0, 0), (1, 1))[:2])["mae"])


def test_level_anchor_benchmark_runs_and_scores_the_labelings(tmp_path, capsys):
    """tools/benchmark_levels.py on 2 held-out v6 studies (both normal anatomy): every level right, both anchors."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("benchmark_levels_tool",
                                                  os.path.join(ROOT, "tools", "benchmark_levels.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "levels.json"
    assert tool.main(["--n", "0", "--output", str(out)]) == 2  # a user mistake: one error line, exit 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["error: --n must be >= 1 and --start >= 0, got --n 0 --start 0"] and not out.exists()
    assert tool.main(["--n", "2", "--seed", "18000", "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert s["measured"] == 2 and s["transitional"] == 0 and s["normal_level_accuracy"] == 1.0
    assert s["sacrum_found"] == 2 and s["normal_false_flags"] == 0
    for r in rep["studies"]:
        assert r["anchor"] == "sacrum+rib" and r["sacrum_source"] == "3d" and r["correct"]
        assert r["reported"] == r["expected"] and 5.0 < r["sacrum_z_error_mm"] < 20.0
    assert not (tmp_path / "levels.json.partial").exists()
    assert "normal anatomy: level accuracy 100.00 %" in capsys.readouterr().out


def test_level_anchor_summary_counts_only_anomalies_an_image_can_show():
    from bmd_d2.evaluation.benchmark_levels import anomaly, summarize

    def rec(ribs, lumbar, names, flagged, among, correct=True, pelvis=True):
        truth = dict(rib_pairs=ribs, lumbar_vertebrae=lumbar, transitional=ribs != 12 or lumbar != 5,
                     pelvis_in_view=pelvis,
                     last_rib_level={11: "T11", 12: "T12", 13: "L1"}[ribs])
        exp = [n for n in names]
        return dict(truth=truth, names=names, anomaly=anomaly(truth, names), reported=exp if correct else exp[::-1],
                    expected=exp, correct=correct, flagged=flagged, correct_among_labelings=among, anchor="sacrum",
                    sacrum_z_error_mm=10.0, sacrum_confidence=1.0, rib_pairs_found=1, seconds=0.1)

    full = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    recs = [rec(12, 5, full, False, True), rec(13, 5, full, True, True, correct=False),
            rec(13, 5, ["L3", "L4", "L5"], False, True),  # the L1 rib out of view: not counted
            rec(12, 6, ["T11", "T12", "L1", "L2", "L3"], False, True, pelvis=False),  # only the rib anchor in view
            rec(11, 6, full, True, False, correct=False),  # two anomalies: flagged, no labeling can be right
            rec(12, 4, full, True, True, correct=False)]
    assert recs[2]["anomaly"] == {"kind": "ribs13", "double": False, "in_view": False}
    assert recs[4]["anomaly"]["double"] and recs[4]["anomaly"]["kind"] == "ribs11+lumbar6"
    s = summarize(recs)
    assert recs[3]["anomaly"]["in_view"] is False  # no sacrum to disagree with the rib
    assert (s["transitional"], s["transitional_single"], s["transitional_double"]) == (5, 2, 1)
    assert s["transitional_flagged"] == 1.0 and s["transitional_correct_among_labelings"] == 1.0
    assert s["meets_transitional_flagged"] and s["normal_level_accuracy"] == 1.0
    recs[1]["flagged"] = False
    assert summarize(recs)["transitional_flagged"] == 0.5 and not summarize(recs)["meets_transitional_flagged"]
