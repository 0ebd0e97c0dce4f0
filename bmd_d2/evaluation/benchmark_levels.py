"""Level-anchor benchmark (issue 18): the 3-D sacrum and last-rib anchors and the counting rule on held-out
generator-v6 phantoms with known anatomy, transitional ones included (11 / 13 rib pairs, 4 / 6 lumbar vertebrae).

The detector is taken out of the loop: the vertebral bodies are the phantom's ground-truth masks on the study's
sagittal image (S1 given as a vertebral body only where it is lumbarised, the sacrum never as a detection), so every
level comes from the 3-D anchors, as on the real example CT where the detector misses the sacrum. Per study it records
the anchors found (sacrum top and last rib against their truth), the labelings of every anchor, the flags and whether
the anatomically correct labeling is among those reported.
"""
import time
from typing import Any, Dict, List, Optional

import numpy as np

from bmd_d2.levels import LEVELS, SACRUM_CLASS, level_class

TARGET_NORMAL_ACCURACY = 0.995
TARGET_TRANSITIONAL_FLAGGED = 1.0
TRANSITIONAL_FLAGS = ("level_count_conflict", "possible_transitional_anatomy")


def truth_detections(sag, labels, lumbar_vertebrae: int = 5, min_area_px: int = 200):
    """Ground-truth body masks of the sagittal image as detections (cranial → caudal) and their anatomical names; the
    sacrum (S1) is left out unless lumbarised (then a vertebral body)."""
    from bmd_d2.evaluation.study_accuracy import truth_masks_on_sagittal

    wanted = [n for n in LEVELS if level_class(n) != SACRUM_CLASS or lumbar_vertebrae == 6]
    masks = truth_masks_on_sagittal(sag, labels, None, wanted, min_area_px=min_area_px)
    if not masks:
        return None, []
    boxes = []
    for m in masks.values():
        r, c = np.nonzero(m)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    dets = dict(boxes=np.array(boxes, float), scores=np.ones(len(boxes)), classes=np.zeros(len(boxes), int),
                bmd=None, masks=np.stack(list(masks.values())))
    return dets, list(masks)


def anomaly(truth: Dict, names: List[str]) -> Dict[str, Any]:
    """The study's transitional anatomy: ``kind`` ("ribs11", "ribs13", "lumbar4", "lumbar6", both joined by "+", or
    None), ``double`` (two anomalies: each anchor is then off by one and no labeling can be right) and ``in_view``
    (whether the image can show it: both anchors in view, i.e. the pelvis and the last rib-bearing level with the one
    below it — T12 and L1 for normal ribs — since only their disagreement reveals it)."""
    parts = []
    if truth["rib_pairs"] != 12:
        parts.append(f"ribs{truth['rib_pairs']}")
    if truth["lumbar_vertebrae"] != 5:
        parts.append(f"lumbar{truth['lumbar_vertebrae']}")
    last = LEVELS.index(truth["last_rib_level"])
    ribs_seen = LEVELS[last] in names and LEVELS[last + 1] in names
    return dict(kind="+".join(parts) or None, double=len(parts) == 2,
                in_view=bool(parts) and ribs_seen and bool(truth.get("pelvis_in_view", True)))


def expected_labeling(names: List[str]) -> List[Optional[str]]:
    """The anatomically correct labels of ``names`` in the counting rule's range T11…L5 (a lumbarised S1: None)."""
    return [n if n in LEVELS[:-1] else None for n in names]


def study_record(seed: int, cfg, opts) -> Dict[str, Any]:
    """Generate one study, label its ground-truth bodies from the 3-D anchors and score the labelings."""
    from bmd_d2.data.dicom import Volume
    from bmd_d2.measure.classical import Calibration
    from bmd_d2.measure.predictor import measure_detections, sagittal_from_cfg
    from bmd_d2.phantoms.dataset import generate_study

    st = generate_study(seed, opts)
    aff = np.asarray(st.affine, float)
    vol, lab = Volume(st.hu, aff), Volume(st.labels.astype(np.float32), aff)
    truth = st.params["level_anchors"]
    sag = sagittal_from_cfg(vol, cfg)
    dets, names = truth_detections(sag, lab, truth["lumbar_vertebrae"])
    rec: Dict[str, Any] = dict(seed=int(seed), truth=truth, names=names, anomaly=anomaly(truth, names))
    if dets is None:
        return dict(rec, skipped="no body in view")
    t = time.perf_counter()
    res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration())
    rec["seconds"] = time.perf_counter() - t
    want = expected_labeling(names)
    got = [v.level for v in res.vertebrae]
    labelings = {k: list(v[:len(names)]) for k, v in (res.levels.get("level_labelings") or {}).items()}
    rec.update(anchor_fields(res, truth))
    rec.update(reported=got, expected=want, correct=bool(got == want), labelings=labelings,
               correct_among_labelings=bool(any(v == want for v in labelings.values())),
               last_rib_level_z_mm=_level_z(st, truth["last_rib_level"]))
    return rec


def anchor_fields(result, truth: Optional[Dict]) -> Dict[str, Any]:
    """What result.json says of one study's level anchors (anchor, sacrum source, the level flags, the sacrum found in
    3-D and the last rib), with the sacrum's height error against the v6 truth where given."""
    lv = result.levels or {}
    sac, rib = lv.get("sacrum_anchor"), lv.get("rib_anchor")
    top = (truth or {}).get("sacrum_top_lps")
    return dict(anchor=lv.get("levels_anchor"), sacrum_source=lv.get("sacrum_source"),
                flags=[f for f in result.qc_flags if f in TRANSITIONAL_FLAGS
                       or f.startswith(("level", "sacrum", "rib"))],
                flagged=bool(set(TRANSITIONAL_FLAGS) & set(result.qc_flags)),
                sacrum_z_mm=(sac["z_mm"] if sac else None), sacrum_confidence=(sac["confidence"] if sac else None),
                sacrum_z_error_mm=(float(sac["z_mm"] - top[2]) if sac and top else None),
                rib_pairs_found=(rib["n_pairs"] if rib else 0), last_rib_z_mm=(rib["lowest_z_mm"] if rib else None))


def _level_z(st, name: str) -> Optional[List[float]]:
    lv = st.params["levels"].get(name)
    if not lv:
        return None
    return [lv["center"][2] - lv["height_mm"] / 2, lv["center"][2] + lv["height_mm"] / 2]


def summarize(records: List[Dict]) -> Dict[str, Any]:
    """Level accuracy on normal anatomy, the transitional studies flagged and with the correct labeling among those
    reported, and the anchors' rates and errors."""
    done = [r for r in records if "skipped" not in r]
    normal = [r for r in done if not r["truth"]["transitional"]]
    trans = [r for r in done if r["truth"]["transitional"]]
    nv = sum(len(r["expected"]) for r in normal)
    ok = sum(sum(a == b for a, b in zip(r["reported"], r["expected"])) for r in normal)
    named = sum(sum(a is not None for a in r["reported"]) for r in normal)
    wrong = sum(sum(a is not None and a != b for a, b in zip(r["reported"], r["expected"])) for r in normal)
    errs = [abs(r["sacrum_z_error_mm"]) for r in done if r["sacrum_z_error_mm"] is not None]
    out = dict(
        studies=len(records), measured=len(done), transitional=len(trans),
        transitional_fraction=len(trans) / len(done) if done else float("nan"),
        normal_vertebrae=nv, normal_level_accuracy=ok / nv if nv else float("nan"),
        normal_named=named, normal_wrong=wrong,
        normal_named_accuracy=(named - wrong) / named if named else float("nan"),
        normal_studies_all_correct=float(np.mean([r["correct"] for r in normal])) if normal else float("nan"),
        normal_false_flags=sum(int(r["flagged"]) for r in normal),
        normal_anchor_both=sum(int(r["anchor"] == "sacrum+rib") for r in normal),
        **_transitional_figures(trans),
        pelvis_in_view=sum(int(r["truth"].get("pelvis_in_view", True)) for r in done),
        sacrum_found=sum(int(r["sacrum_z_error_mm"] is not None) for r in done),
        sacrum_found_without_pelvis=sum(int(r["sacrum_confidence"] is not None and not r["truth"].get(
            "pelvis_in_view", True)) for r in done),
        sacrum_top_abs_error_mm=_error_stats(errs),
        rib_found=sum(int(r["rib_pairs_found"] > 0) for r in done),
        seconds_p50=float(np.median([r["seconds"] for r in done])) if done else float("nan"),
    )
    return _with_verdicts(out)


def _transitional_figures(trans: List[Dict]) -> Dict[str, Any]:
    """The transitional studies' figures; each item holds ``anomaly`` (:func:`anomaly`), ``flagged`` and
    ``correct_among_labelings``. The targets' denominator: one anomaly, in view (two anomalies shift both anchors:
    flagged, not resolvable)."""
    by_kind: Dict[str, Dict[str, int]] = {}
    for r in trans:
        a = r["anomaly"]
        k = by_kind.setdefault(a["kind"], dict(n=0, in_view=0, flagged=0, correct_among=0))
        k["n"] += 1
        k["in_view"] += int(a["in_view"])
        k["flagged"] += int(r["flagged"] and a["in_view"])
        k["correct_among"] += int(r["correct_among_labelings"] and a["in_view"])
    single = [r for r in trans if r["anomaly"]["in_view"] and not r["anomaly"]["double"]]
    double = [r for r in trans if r["anomaly"]["in_view"] and r["anomaly"]["double"]]

    def share(key):
        return sum(int(r[key]) for r in single) / len(single) if single else float("nan")

    return dict(transitional_in_view=len(single) + len(double), transitional_single=len(single),
                transitional_flagged=share("flagged"),
                transitional_correct_among_labelings=share("correct_among_labelings"),
                transitional_double_flagged=sum(int(r["flagged"]) for r in double), transitional_double=len(double),
                transitional_by_kind=by_kind)


def _error_stats(errs: List[float]) -> Optional[Dict[str, float]]:
    return dict(median=float(np.median(errs)), max=float(np.max(errs))) if errs else None


def _with_verdicts(out: Dict[str, Any]) -> Dict[str, Any]:
    """``out`` with ``meets_normal_accuracy`` and ``meets_transitional_flagged`` (flagged and the right labeling
    reported on every transitional study with one anomaly in view)."""
    out["meets_normal_accuracy"] = bool(out["normal_level_accuracy"] >= TARGET_NORMAL_ACCURACY)
    out["meets_transitional_flagged"] = bool(out["transitional_single"]
                                             and out["transitional_flagged"] >= TARGET_TRANSITIONAL_FLAGGED
                                             and out["transitional_correct_among_labelings"] >= 1.0)
    return out


def accuracy_record(result, truth: Optional[Dict], pairs: List[Dict], names: List[str]) -> Dict[str, Any]:
    """The level anchors of one study measured with the model (``tools/benchmark_accuracy.py``): what result.json
    says (anchor, sacrum source, flags, the sacrum's and the last rib's position) and, with the v6 truth
    (``params["level_anchors"]``), which labelings are right on the matched vertebrae (a truth S1 may be called S1 or
    nothing)."""
    rec = anchor_fields(result, truth)
    if not truth:
        return rec

    def ok(label, gt):
        return label in ("S1", None) if gt == "S1" else label == gt

    def right(labels):
        return bool(pairs) and all(ok(labels[p["pred_index"]], p["gt_level"]) for p in pairs
                                   if p["pred_index"] < len(labels))

    labelings = (result.levels or {}).get("level_labelings") or {}
    rec.update(truth=truth, names=list(names), anomaly=anomaly(truth, names),
               labelings_right={k: right(v) for k, v in labelings.items()})
    rec["correct_among_labelings"] = any(rec["labelings_right"].values())
    return rec


def summarize_accuracy_records(records: List[Dict]) -> Optional[Dict[str, Any]]:
    """Issue 18's figures over ``tools/benchmark_accuracy.py`` records that carry the v6 truth (None without any):
    level accuracy of matched vertebral bodies on normal anatomy, transitional studies (one anomaly, in view) flagged
    and with the right labeling among those reported."""
    recs = [r for r in records if (r.get("level_anchors") or {}).get("truth")]
    if not recs:
        return None
    normal = [r for r in recs if not r["level_anchors"]["truth"]["transitional"]]
    trans = [r for r in recs if r["level_anchors"]["truth"]["transitional"]]
    pairs = [p for r in normal for p in r["pairs"] if p["gt_level"] != "S1"]
    named = [p for p in pairs if p["pred_level"] is not None]
    errs = [abs(r["level_anchors"]["sacrum_z_error_mm"]) for r in recs
            if r["level_anchors"].get("sacrum_z_error_mm") is not None]
    out = dict(
        studies=len(recs), transitional=len(trans), transitional_fraction=len(trans) / len(recs),
        normal_vertebrae=len(pairs),
        normal_level_accuracy=(sum(p["pred_level"] == p["gt_level"] for p in pairs) / len(pairs)) if pairs
        else float("nan"),
        normal_named=len(named), normal_wrong=sum(int(p["pred_level"] != p["gt_level"]) for p in named),
        normal_false_flags=sum(int(r["level_anchors"]["flagged"]) for r in normal),
        anchors={k: sum(int(r["level_anchors"]["anchor"] == k) for r in recs) for k in ("sacrum+rib", "sacrum", "rib")},
        sacrum_sources={k: sum(int(r["level_anchors"]["sacrum_source"] == k) for r in recs)
                        for k in ("detector", "3d", "detector+3d")},
        **_transitional_figures([r["level_anchors"] for r in trans]),
        sacrum_found=len(errs), sacrum_top_abs_error_mm=_error_stats(errs),
        rib_found=sum(int(r["level_anchors"]["rib_pairs_found"] > 0) for r in recs),
    )
    return _with_verdicts(out)


def format_report(s: Dict[str, Any]) -> str:
    """Human-readable summary lines."""
    lines = [
        f"Level anchors: {s['measured']} studies, {s['transitional']} transitional "
        f"({100 * s['transitional_fraction']:.0f} %)",
        f"  normal anatomy: level accuracy {100 * s['normal_level_accuracy']:.2f} % of {s['normal_vertebrae']} "
        f"vertebrae (target ≥ {100 * TARGET_NORMAL_ACCURACY:g} % "
        f"{'met' if s['meets_normal_accuracy'] else 'MISSED'}); "
        f"{s['normal_named']} named, {s['normal_wrong']} of them wrong (named accuracy "
        f"{100 * s['normal_named_accuracy']:.2f} %), the rest unnamed (no usable anchor); both anchors agreeing on "
        f"{s['normal_anchor_both']} studies, falsely flagged {s['normal_false_flags']}",
        f"  transitional, one anomaly in view ({s['transitional_single']}): flagged "
        f"{100 * s['transitional_flagged']:.0f} %, correct labeling among those reported "
        f"{100 * s['transitional_correct_among_labelings']:.0f} % (target 100 % / 100 % "
        f"{'met' if s['meets_transitional_flagged'] else 'MISSED'}); two anomalies: {s['transitional_double_flagged']}"
        f"/{s['transitional_double']} flagged; anomaly out of view: "
        f"{s['transitional'] - s['transitional_in_view']}; by kind {s['transitional_by_kind']}",
        f"  sacrum found {s['sacrum_found']}/{s['pelvis_in_view']} with the pelvis in view (and "
        f"{s['sacrum_found_without_pelvis']} without), |top error| {s['sacrum_top_abs_error_mm']}; "
        f"last rib found {s['rib_found']}/{s['measured']}; anchors + rule p50 {s['seconds_p50']:.2f} s",
    ]
    return "\n".join(lines)
