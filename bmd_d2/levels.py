"""Vertebral levels: names, label values and Detectron2 classes, and the rule that names the detected bodies.

The one home of everything about levels (it imports only numpy).

**Label values.** Every label volume in the project (phantom ``labels.nii.gz``/``cores.nii.gz``, user label volumes
after mapping) uses ``label value = LEVELS.index(level) + 1``: T11 = 1, T12 = 2, L1 = 3, L2 = 4, L3 = 5, L4 = 6,
L5 = 7, S1 = 8, and 0 for background. Levels run cranial → caudal, so a larger label value lies lower (more
inferior) in the patient.

Detectron2 thing classes: 0 = ``vertebral_body`` (T11…L5), 1 = ``sacrum`` (S1, the anchor for level counting).

**Level counting** (:func:`assign_levels`) for the vertebral bodies detected in one sagittal image. The rule
(documented in docs/measurement.md):

1. **Anchor on the sacrum.** Detections of class 1 (``sacrum``) are S1. With several (study flag
   ``multiple_sacrum_detections``), the most cranial one scoring at least ``SACRUM_SCORE_FRACTION`` of the best is
   kept: the sacrum's lower segments (S2, S3) look like its top and draw extra detections, and counting from one of
   them would shift every level by one. Vertebral bodies whose centre lies caudal to the top of the sacrum
   box are rejected (``caudal_to_sacrum``: coccyx, pelvis or false positives). The **3-D sacrum** (``sacrum3d``:
   :class:`SacrumLevel`, the top of the sacroiliac joints found by :func:`bmd_d2.measure.anchors.find_sacrum`) is
   the sacrum counted from when the detector finds none (``sacrum_source`` "3d"), and the detector's cross-check when
   it does ("detector+3d": its count is the labeling ``sacrum_3d``). It is taken like the top of a sacrum box: the
   lowest body whose centre lies above it (or less than ``SACRUM3D_FUSED_FRACTION`` of a pitch below it) is L5;
   bodies further below belong to the fused sacral mass (a sacralised L5: ``possible_transitional_anatomy``) and
   count below L5. Below ``SACRUM3D_MIN_CONFIDENCE``: not used (``sacrum_3d_low_confidence``).
2. **Order** the remaining vertebral bodies (class 0) along the spine by their centre row (the sagittal row axis runs
   head → feet). Two centres closer than ``DUPLICATE_FRACTION`` of the vertebral pitch are one vertebra: the
   lower-scoring one is rejected (``duplicate``).
3. **Count upward** from the sacrum: the caudal-most body is L5, the next L4 … unless the spacing says a vertebra
   was missed: the pitch (centre-to-centre distance, mm) is the median of the consecutive distances (with none usable,
   ``HEIGHT_TO_PITCH`` × the median box height), and a distance ``d`` hides
   ``floor(d / pitch + 0.5) - 1`` undetected vertebrae, which are skipped in the count (vertebra flag
   ``level_after_gap``, study flag ``level_gap``). Between L5 and the sacrum the expected distance from the L5 centre
   to the top of the sacrum is ``SACRUM_OFFSET`` pitches. Only distances below ``GAP_FRACTION`` × the height-based
   pitch enter the median, so a gap does not inflate the pitch it is measured against.
4. **Count from the last rib** (``ribs``: :class:`RibLevel`, found in 3-D by
   :func:`bmd_d2.measure.anchors.find_ribs`): the body whose centre row lies within ``RIB_TIE_FRACTION`` of a pitch
   of the lowest rib-bearing level's costovertebral joints is T12 (the usual convention: 12 rib pairs), and the
   others are counted from it as from the sacrum (gaps included). Joints one pitch (± ``RIB_TIE_FRACTION``) above
   the cranial-most body belong to a body cut by the top of the field of view (or undetected): the cranial-most body
   is counted as the level below it (``rib_body_above_detections``). Not used below ``RIB_MIN_CONFIDENCE``
   (``rib_anchor_low_confidence``) or with no body at the joints' height (``rib_anchor_untied``). The number of
   rib-bearing levels in view is reported (``rib_pairs_in_view``).
5. **Cross-check.** Every count (the sacrum, the 3-D sacrum beside a detected one, the last rib) giving the same
   levels: ``anchor = "sacrum+rib"`` (or "sacrum" without a rib). Different counts (11 or 13 rib pairs, a sacralised
   L5 or a lumbarised S1, or a wrong anchor): the study and every body are flagged ``level_count_conflict``, every
   labeling is kept (``labelings``) and the levels are counted from ``PRIMARY_ANCHOR`` (the sacrum, as
   TotalSegmentator and most radiology reports count; the detector's sacrum when it found one, being the
   better-tested). A body counted below L5 gets no name (``below_labelled_range``). One anchor: the levels are counted
   from it (``anchor`` "sacrum" or "rib").
6. **No anchor** (``levels_unanchored``): with ``rule="lowest_is_L5"`` (default) the caudal-most body is called L5
   *only if* the image continues at least one pitch below it (the sacrum should then have been in view and was
   missed by the detector); otherwise the field of view ends inside the lumbar spine and no level can be named:
   every level is None and the study is flagged ``levels_unknown``. ``rule="none"`` never names unanchored levels.
7. **Never guess silently.** Counting past T11 gives None (``above_labelled_range``). A caudal-most body much shorter
   than the others (< ``TRANSITIONAL_HEIGHT_RATIO`` × their median height) or almost touching the sacrum suggests a
   lumbosacral transitional vertebra (``possible_transitional_anatomy``): the labels are still given, flagged.
   Boxes touching the image edge are ``truncated_by_image_edge``; a study missing any of L1–L4 is
   ``partial_coverage``.

Sagittal images cannot show ribs or the sacroiliac joints: those anchors come from the 3-D volume. Without the rib
anchor thoracolumbar transitional anatomy (11 or 13 rib-bearing vertebrae) cannot be recognised; without the 3-D
sacrum a lumbarised S1 or a sacralised L5 that the detector counts normally goes unnoticed; the count from the
sacrum is then the convention. Two anomalies at once (e.g. 11 ribs and a lumbarised S1) shift both counts: flagged,
but neither labeling is right.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LEVELS: Tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
LEVEL_TO_LABEL: Dict[str, int] = {name: i + 1 for i, name in enumerate(LEVELS)}
LABEL_TO_LEVEL: Dict[int, str] = {i + 1: name for i, name in enumerate(LEVELS)}

THING_CLASSES: Tuple[str, ...] = ("vertebral_body", "sacrum")
VERTEBRAL_BODY_CLASS = 0
SACRUM_CLASS = 1


def level_label(level: str) -> int:
    """Label value (1…8) of a level name such as ``"L3"``; raises ``KeyError`` for unknown names."""
    return LEVEL_TO_LABEL[level.upper()]


def level_name(label: int) -> str:
    """Level name of a label value (1…8); raises ``KeyError`` for 0 or unknown values."""
    return LABEL_TO_LEVEL[int(label)]


def level_class(level: str) -> int:
    """Detectron2 category id of a level: ``SACRUM_CLASS`` for S1, ``VERTEBRAL_BODY_CLASS`` otherwise."""
    return SACRUM_CLASS if level.upper() == "S1" else VERTEBRAL_BODY_CLASS
VERTEBRA_CLASS = VERTEBRAL_BODY_CLASS  # short name used by the counting rule


HEIGHT_TO_PITCH = 1.35  # pitch ≈ body height + disc height
DUPLICATE_FRACTION = 0.45
GAP_FRACTION = 1.5
SACRUM_OFFSET = 0.6  # expected (top of sacrum - centre of L5) / pitch
TRANSITIONAL_HEIGHT_RATIO = 0.7
SACRUM_SCORE_FRACTION = 0.5
TRANSITIONAL_MIN_SACRUM_OFFSET = 0.25
EDGE_MARGIN_PX = 1
RIB_TIE_FRACTION = 0.4  # the last rib's joints lie within this fraction of a pitch of its body's centre row
SACRUM3D_FUSED_FRACTION = 0.25  # a body centred this far (pitches) below the 3-D sacrum's top is fused to it
SACRUM3D_MIN_CONFIDENCE = 0.6  # below it (short joints, or their top out of view) the 3-D sacrum is not used
RIB_MIN_CONFIDENCE = 0.6  # below it (the only rib-bearing level in view, one side only) the rib anchor is not used
PRIMARY_ANCHOR = "sacrum"  # the count used when the anchors disagree (level_count_conflict)
_S1 = LEVELS.index("S1")
_L5 = LEVELS.index("L5")
_T12 = LEVELS.index("T12")
_LUMBAR_REQUIRED = ("L1", "L2", "L3", "L4")


@dataclass
class Detection:
    """One detected instance in sagittal pixel coordinates.

    Attributes:
        category: 0 vertebral body, 1 sacrum.
        score: detection confidence in [0, 1].
        box: ``(x0, y0, x1, y1)`` pixels (x = column, y = row, rows run head → feet).
        centroid: ``(x, y)`` pixels of the mask (or box) centre.
    """

    category: int
    score: float
    box: Tuple[float, float, float, float]
    centroid: Tuple[float, float]


@dataclass
class LevelAssignment:
    """The outcome of :func:`assign_levels`, indexed like the input detections.

    Attributes:
        levels: level name or None per detection.
        flags: QC flags per detection.
        rejected: detection index → reason, for detections that are not measured at all.
        order: indices of kept detections, cranial → caudal (sacrum last).
        study_flags: QC flags of the whole study.
        anchored: whether an anchor (sacrum and/or last rib) anchored the count.
        pitch_mm: vertebral pitch used for gap detection (mm), or None.
        anchor: what the levels are counted from: "sacrum+rib" (both, agreeing), "sacrum" (the sacrum alone, or both
            in conflict: ``level_count_conflict``), "rib", or None (unanchored).
        labelings: anchor name ("sacrum", "rib") → the level it gives each detection of ``order`` (None where it
            names none), for every anchor counted from.
        rib_pairs_in_view: rib-bearing levels found in 3-D (None when the rib search was not run).
        sacrum_source: where the sacrum counted from comes from: "detector" (the sagittal detector's sacrum box),
            "3d" (:func:`bmd_d2.measure.anchors.find_sacrum`, no sacrum detected), "detector+3d" (both: the
            detector's is counted from, the 3-D one is its cross-check, labeling ``sacrum_3d``), or None.
    """

    levels: List[Optional[str]]
    flags: List[List[str]]
    rejected: Dict[int, str] = field(default_factory=dict)
    order: List[int] = field(default_factory=list)
    study_flags: List[str] = field(default_factory=list)
    anchored: bool = False
    pitch_mm: Optional[float] = None
    anchor: Optional[str] = None
    labelings: Dict[str, List[Optional[str]]] = field(default_factory=dict)
    rib_pairs_in_view: Optional[int] = None
    sacrum_source: Optional[str] = None


@dataclass
class SacrumLevel:
    """The 3-D sacrum anchor as the counting rule takes it (:func:`bmd_d2.measure.anchors.find_sacrum`).

    Attributes:
        row: sagittal row (pixels, float) of the top of the sacroiliac joints (the fused sacral mass), compared with
            the body centres like the top of a detected sacrum box.
        confidence: 0…1; below ``SACRUM3D_MIN_CONFIDENCE`` it is reported but not counted from.
    """

    row: float
    confidence: float


@dataclass
class RibLevel:
    """The rib anchor as the counting rule takes it (found in 3-D by :func:`bmd_d2.measure.anchors.find_ribs`).

    Attributes:
        row: sagittal row (pixels, float) of the lowest rib-bearing level's costovertebral joints.
        n_pairs: rib-bearing levels in view.
        confidence: 0…1; below ``RIB_MIN_CONFIDENCE`` the anchor is reported but not counted from.
    """

    row: float
    n_pairs: int
    confidence: float


def add_flag(flags: List[str], flag: str):
    """Append ``flag`` to the QC flag list ``flags`` unless it is there already (flags keep first-raised order)."""
    if flag not in flags:
        flags.append(flag)


def assign_levels(detections: Sequence[Detection], *, pixel_spacing_mm: float = 1.0,
                  image_shape: Optional[Tuple[int, int]] = None, fov_rows: Optional[Tuple[int, int]] = None,
                  rule: str = "lowest_is_L5", ribs: Optional[RibLevel] = None,
                  sacrum3d: Optional[SacrumLevel] = None) -> LevelAssignment:
    """Name the level of every detection by the rule in the module docstring.

    Args:
        detections: detections above the score threshold, any order.
        pixel_spacing_mm: sagittal pixel size (mm), isotropic.
        image_shape: ``(H, W)`` of the sagittal image, for edge checks; None skips them.
        fov_rows: ``(first, last)`` rows of the image that hold scanned anatomy (not padding); default the whole
            image height.
        rule: what to do without an anchor: "lowest_is_L5" or "none".
        ribs: the last-rib anchor (its joints' sagittal row), or None when the rib search was not run / found none.
        sacrum3d: the sacrum found in 3-D from its sacroiliac joints, or None.

    Returns:
        A :class:`LevelAssignment`.
    """
    if rule not in ("lowest_is_L5", "none"):
        raise ValueError(f"unknown unanchored level rule {rule!r}")
    n = len(detections)
    out = LevelAssignment(levels=[None] * n, flags=[[] for _ in range(n)])
    sp = float(pixel_spacing_mm)

    for i, d in enumerate(detections):
        if d.category not in (VERTEBRA_CLASS, SACRUM_CLASS):
            out.rejected[i] = "unknown_class"
        elif image_shape is not None:
            h, w = image_shape
            x0, y0, x1, y1 = d.box
            if x0 <= EDGE_MARGIN_PX or y0 <= EDGE_MARGIN_PX or x1 >= w - 1 - EDGE_MARGIN_PX \
                    or y1 >= h - 1 - EDGE_MARGIN_PX:
                add_flag(out.flags[i], "truncated_by_image_edge")

    sacra = [i for i in range(n) if detections[i].category == SACRUM_CLASS and i not in out.rejected]
    sacrum = None
    if sacra:
        best = max(detections[i].score for i in sacra)
        plausible = [i for i in sacra if detections[i].score >= SACRUM_SCORE_FRACTION * best]
        sacrum = min(plausible, key=lambda i: (detections[i].box[1], -detections[i].score))  # most cranial
    for i in sacra:
        if i == sacrum:
            continue
        out.rejected[i] = "duplicate_sacrum"
        add_flag(out.study_flags, "multiple_sacrum_detections")

    verts = [i for i in range(n) if detections[i].category == VERTEBRA_CLASS and i not in out.rejected]
    if sacrum is not None:
        top = detections[sacrum].box[1]
        for i in list(verts):
            if detections[i].centroid[1] >= top:
                out.rejected[i] = "caudal_to_sacrum"
                verts.remove(i)
    verts.sort(key=lambda i: (detections[i].centroid[1], -detections[i].score))

    heights = [detections[i].box[3] - detections[i].box[1] for i in verts]
    height_pitch = HEIGHT_TO_PITCH * float(np.median(heights)) * sp if heights else None

    # duplicates: centres much closer than a vertebral pitch
    if height_pitch:
        kept: List[int] = []
        for i in verts:
            if kept and _dist(detections[kept[-1]], detections[i], sp) < DUPLICATE_FRACTION * height_pitch:
                j = kept[-1]
                loser, winner = (i, j) if detections[i].score <= detections[j].score else (j, i)
                out.rejected[loser] = "duplicate"
                kept[-1] = winner
            else:
                kept.append(i)
        verts = kept

    dists = [_dist(detections[a], detections[b], sp) for a, b in zip(verts[:-1], verts[1:])]
    # intervals that do not look like gaps (< GAP_FRACTION x the height-based pitch) give the pitch
    regular = [d for d in dists if height_pitch and d < GAP_FRACTION * height_pitch]
    pitch = float(np.median(regular)) if regular else height_pitch
    out.pitch_mm = pitch
    out.order = verts + ([sacrum] if sacrum is not None else [])
    if ribs is not None:
        out.rib_pairs_in_view = int(ribs.n_pairs)
    if not verts and sacrum is None:
        add_flag(out.study_flags, "no_vertebrae_detected")
        return out

    # missing vertebrae hidden in each gap (between verts[k] and verts[k+1])
    missing = [max(0, math.floor(d / pitch + 0.5) - 1) if pitch else 0 for d in dists]
    # rel[k]: count positions from verts[k] down to the caudal-most body, undetected vertebrae included
    rel = [0] * len(verts)
    for k in range(len(verts) - 2, -1, -1):
        rel[k] = rel[k + 1] + 1 + missing[k]

    if sacrum is not None:
        out.levels[sacrum] = "S1"
    if sacrum3d is not None and sacrum3d.confidence < SACRUM3D_MIN_CONFIDENCE:
        add_flag(out.study_flags, "sacrum_3d_low_confidence")
        sacrum3d = None
    if sacrum is not None:
        if not verts:
            out.anchored, out.anchor, out.labelings = True, "sacrum", {"sacrum": ["S1"]}
            _finish(out, detections)
            return out
    low = verts[-1]
    # each anchor gives the level index of the caudal-most body
    anchors: Dict[str, int] = {}
    if sacrum is not None:
        offset = (detections[sacrum].box[1] - detections[low].centroid[1]) * sp
        miss_sac = _missed_above_sacrum(offset, pitch) if pitch else 0
        if miss_sac:
            add_flag(out.flags[low], "level_after_gap")
            add_flag(out.study_flags, "level_gap")
        anchors["sacrum"] = _S1 - 1 - miss_sac
        # transitional-anatomy hints
        others = [detections[i].box[3] - detections[i].box[1] for i in verts[:-1]]
        low_h = detections[low].box[3] - detections[low].box[1]
        if (len(others) >= 2 and low_h < TRANSITIONAL_HEIGHT_RATIO * float(np.median(others))) or \
                (pitch and offset < TRANSITIONAL_MIN_SACRUM_OFFSET * pitch):
            add_flag(out.flags[low], "possible_transitional_anatomy")
            add_flag(out.study_flags, "possible_transitional_anatomy")
    if sacrum3d is not None and pitch:
        pos3 = _sacrum3d_position(detections, verts, rel, sacrum3d, pitch, sp, out if sacrum is None else None)
        if pos3 is not None:
            anchors["sacrum" if sacrum is None else "sacrum_3d"] = pos3
            out.sacrum_source = "3d" if sacrum is None else "detector+3d"
    rib_pos = _rib_position(detections, verts, rel, ribs, pitch, sp, out.study_flags)
    if rib_pos is not None:
        anchors["rib"] = rib_pos

    if anchors:
        out.anchored = True
        if out.sacrum_source is None and "sacrum" in anchors:
            out.sacrum_source = "detector"
        for name, p in anchors.items():
            out.labelings[name] = [_level_at(p - r) for r in rel] + (["S1"] if sacrum is not None else [])
        kinds = {"sacrum" if k.startswith("sacrum") else k for k in anchors}
        if len(set(anchors.values())) == 1:
            out.anchor = "+".join(k for k in ("sacrum", "rib") if k in kinds)
        else:  # never a silent choice: flagged, every labeling kept, counted from PRIMARY_ANCHOR
            out.anchor = PRIMARY_ANCHOR if PRIMARY_ANCHOR in anchors else next(iter(anchors))
            add_flag(out.study_flags, "level_count_conflict")
            for i in verts:
                add_flag(out.flags[i], "level_count_conflict")
        pos = anchors["sacrum" if out.anchor in ("sacrum+rib", "sacrum") else out.anchor]
    else:
        add_flag(out.study_flags, "levels_unanchored")
        first, last = fov_rows if fov_rows is not None else (0, (image_shape[0] - 1) if image_shape else None)
        below_mm = ((last - detections[low].box[3]) * sp) if last is not None else 0.0
        if rule == "none" or not pitch or below_mm < pitch:
            add_flag(out.study_flags, "levels_unknown")
            for i in verts:
                add_flag(out.flags[i], "levels_unanchored")
            _finish(out, detections)
            return out
        pos = _S1 - 1
        for i in verts:
            add_flag(out.flags[i], "levels_unanchored")

    for k in range(len(verts) - 1, -1, -1):
        i = verts[k]
        idx = pos - rel[k]
        if idx < 0:
            add_flag(out.flags[i], "above_labelled_range")
        elif idx > _L5:
            add_flag(out.flags[i], "below_labelled_range")
        else:
            out.levels[i] = LEVELS[idx]
        if k > 0 and missing[k - 1]:
            add_flag(out.flags[verts[k - 1]], "level_after_gap")
            add_flag(out.study_flags, "level_gap")
    _finish(out, detections)
    return out


def _level_at(idx: int) -> Optional[str]:
    """The vertebral-body level of count position ``idx`` (T11 = 0 … L5), None outside T11…L5."""
    return LEVELS[idx] if 0 <= idx <= _L5 else None


def _missed_above_sacrum(offset_mm: float, pitch: float) -> int:
    """Undetected vertebrae between the lowest counted body and the top of the sacrum ``offset_mm`` below its centre
    (expected: ``SACRUM_OFFSET`` pitches)."""
    return max(0, math.floor((offset_mm - SACRUM_OFFSET * pitch) / pitch + 0.5))


def _sacrum3d_position(detections: Sequence[Detection], verts: List[int], rel: List[int], sac: SacrumLevel,
                       pitch: float, sp: float, out: Optional["LevelAssignment"]) -> Optional[int]:
    """Level index of the caudal-most body counted from the 3-D sacrum: the lowest body whose centre lies above the
    top of the sacroiliac joints (or less than ``SACRUM3D_FUSED_FRACTION`` of a pitch below it: a steep real sacrum's
    joints rise to the height of L5's centre) is L5, gaps counted as with a detected sacrum; bodies further below
    belong to the fused sacral mass (a sacralised L5) and count below L5 (``possible_transitional_anatomy``). None
    without a body above it. ``out`` None (a cross-check of the detector's sacrum): no flag is raised."""
    limit = sac.row + SACRUM3D_FUSED_FRACTION * pitch / sp
    above = [k for k, i in enumerate(verts) if detections[i].centroid[1] < limit]
    if not above:
        if out is not None:
            add_flag(out.study_flags, "sacrum_3d_above_bodies")
        return None
    j = above[-1]
    miss = _missed_above_sacrum((sac.row - detections[verts[j]].centroid[1]) * sp, pitch)
    if out is not None and miss:
        add_flag(out.flags[verts[j]], "level_after_gap")
        add_flag(out.study_flags, "level_gap")
    if out is not None and j < len(verts) - 1:
        add_flag(out.study_flags, "possible_transitional_anatomy")
        for k in range(j + 1, len(verts)):
            add_flag(out.flags[verts[k]], "possible_transitional_anatomy")
    return _L5 - miss + rel[j]


def _rib_position(detections: Sequence[Detection], verts: List[int], rel: List[int], ribs: Optional[RibLevel],
                  pitch: Optional[float], sp: float, study_flags: List[str]) -> Optional[int]:
    """Level index of the caudal-most body counted from the last rib (its body is T12), or None: no usable rib
    anchor (``rib_anchor_low_confidence``) or no detected body at the joints' height (``rib_anchor_untied``)."""
    if ribs is None or not verts or not pitch:
        return None
    if ribs.confidence < RIB_MIN_CONFIDENCE:
        add_flag(study_flags, "rib_anchor_low_confidence")
        return None
    d = [abs(detections[i].centroid[1] - ribs.row) * sp for i in verts]
    k = int(np.argmin(d))
    if d[k] <= RIB_TIE_FRACTION * pitch:
        return _T12 + rel[k]
    # one pitch above the cranial-most body: its body is cut by the top of the field of view (or undetected), so
    # the cranial-most body is the one below the last rib-bearing level
    above = (detections[verts[0]].centroid[1] - ribs.row) * sp
    if abs(above - pitch) <= RIB_TIE_FRACTION * pitch:
        add_flag(study_flags, "rib_body_above_detections")
        return _T12 + 1 + rel[0]
    add_flag(study_flags, "rib_anchor_untied")  # between bodies or far from them: no count from it
    return None


def _finish(out: LevelAssignment, detections: Sequence[Detection]):
    named = {lvl for lvl in out.levels if lvl}
    if any(lvl not in named for lvl in _LUMBAR_REQUIRED):
        add_flag(out.study_flags, "partial_coverage")
    if any("truncated_by_image_edge" in out.flags[i] for i in out.order):
        add_flag(out.study_flags, "partial_coverage")


def _dist(a: Detection, b: Detection, sp: float) -> float:
    return math.hypot(a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]) * sp
