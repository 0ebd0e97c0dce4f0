"""Two level anchors found in the 3-D HU volume, independent of the sagittal detector: the sacrum and the last ribs.

Both work on the mid-sagittal plane's LPS-aligned coarse grid (:func:`bmd_d2.data.sagittal.find_midsagittal_plane`
builds the same ``COARSE_MM`` = 2 mm grid), in a frame that follows the spine: the plane gives the lateral midline
``x_mid(y, z)`` (``u`` = signed lateral distance from it, + = patient left) and the plane's centreline (one vertebral
body centre per 30 mm slab, interpolated in z) gives the body's antero-posterior position ``y_b(z)``. A fallback plane
(no spine found) gives no anchor. Bone is ``C >= BONE_HU`` (150 HU): the coarse grid averages a 1 mm cortex with its
surroundings, so cortical bone, ribs at 3 mm voxels and dense trabecular bone pass, fat, muscle, discs (55–120 HU)
and unenhanced organs do not.

Sacrum (:func:`find_sacrum`): the sacroiliac joints
-----------------------------------------------------
The sacrum is the vertebra that is joined to the pelvis: from S1 to S2/S3 its lateral masses meet the ilia at the
sacroiliac (SI) joints, so in those axial slices one piece of bone runs from the sacral body out to both iliac wings.
No lumbar vertebra does that (the L5 transverse processes end short of the iliac crest), nor does a rib (10–15 mm
tall, it leaves an axial slice within a few cm as it falls) or the hip (not joined to the midline).

1. **Joined slices.** Per axial row of the grid: bone (``C >= BONE_HU``) within ``SI_AP_MM`` (-100…+100 mm) of the
   body's AP centre and ``SI_OUTER_MM`` (170 mm) of the midline, closed by one 3 × 3 pixel step (a 2–4 mm joint cleft
   on the 2 mm grid is bridged); the 8-connected pieces touching the seed (the body's core: ``|u|`` ≤ 12 mm, -15…+35
   mm AP) are the sacral body and what is joined to it. The slice is *joined* when that bone reaches
   ``SI_REACH_MM`` (70 mm) from the midline on both sides with at least ``ILIAC_MIN_AREA_MM2`` (150 mm²) of it beyond
   ``SI_ILIAC_MM`` (60 mm) on each side (the iliac wing, not a process tip).
2. **The joints.** Runs of joined rows (single missing rows bridged); the longest one of at least ``SI_MIN_RUN_MM``
   (20 mm) is the SI joints; none: None (pelvis out of view, or not joined: generator v5 phantoms, whose iliac wings
   never touch the sacrum).
3. **The anchor** is the top of the joints on the spine's centreline: on the tilted top segment of the fused mass it
   lies 8–16 mm above that segment's superior-endplate centre (phantoms; on the real CT 12 mm above the L5/S1 disc's
   centre, 6 mm below L5's centre), about where the top of a detected sacrum box lies, so the counting rule takes it
   like one (:class:`bmd_d2.levels.SacrumLevel`). The top of the *fused* mass is what it finds: a sacralised L5 joined
   to the ilia is found as the top (its count is then one level off, and the rib anchor disagrees), a lumbarised S1
   free of them is not.
4. **Confidence** = min(1, length / ``SI_FULL_RUN_MM`` (30 mm)) × (0.6 + 0.4 × min(1, median reach / 100 mm)), halved
   when the joints run out of the top of the field of view.

Status (issue 18, session 12; ``tools/benchmark_levels.py``, 100 held-out generator-v6 phantoms, seed 18000, 24
transitional, 7 with the pelvis out of view): found on 93 of the 93 with the pelvis in view and on none of the 7, top
10.3 mm (median) / 16.3 mm (max) above the fused mass's top endplate centre, never at another level; the real example CT: joints z 208–234 mm (28 mm, reach 93 mm), confidence 0.91, the top
between the L5/S1 disc and L5's centre. Fields of view above the pelvis and v5 phantoms (plates not joined) give None.

Ribs (:func:`find_ribs`)
------------------------
1. **Rib mask.** In the AP window -120…+90 mm of the body: ``C >= RIB_HU`` (70 HU) and ``max(C, 0)`` at least
   ``RIB_TOPHAT_HU`` (40 HU) above its grey opening by a ``RIB_OPEN_MM`` (14 mm) in-plane box: a rib (10 mm thick)
   does not hold the box, a contrast-enhanced kidney (140–200 HU, brighter than an osteoporotic rib on the 2 mm grid),
   the liver or a body does, so their interiors drop out whatever their HU. A fixed ``BONE_HU`` threshold with 3-D
   components (the earlier method) lost low-BMD ribs under 150 HU and merged ribs touching an enhanced kidney.
2. **Lateral slabs.** Per side, the mask is resampled into 2 mm slabs of constant ``u`` (40…170 mm). Seeds are the
   2-D blobs of the first slabs (u 40–44 mm) no taller or deeper than ``RIB_SEED_MAX_MM`` (24 mm), with their centre
   ``RIB_SEED_AP_MM`` (+15…+70 mm) posterior of the body centre (the rib passes the transverse process there; the
   sacral alae and the iliac wings lie in front of it) and not touching the top or bottom of the field of view. A
   taller blob, or one touching the top or bottom, is split into the blobs of each of those slabs alone that pass
   (a short 13th rib is still joined to L1's transverse process at u 40 mm and free of it by 44 mm; a rib near the top
   of the field of view may be joined there to other bone; :func:`_rib_seeds`).
3. **Tracing.** Each seed is followed outward slab by slab inside a ``RIB_TRACK_MM`` (8 mm) disc around the position
   predicted from the last steps; a slab counts when it holds at least ``RIB_SECTION_MM2`` (48 mm²) of mask there
   (after three slabs: ``RIB_SECTION_FRACTION`` of the track's median section, at least ``RIB_SECTION_MIN_MM2``,
   and the weaker ``RIB_TOPHAT_WEAK_HU`` (20 HU) mask counts: a rib running along the liver or a kidney), the trace
   stops after two empty slabs. A rib runs at least ``RIB_MIN_RUN_MM`` (36 mm) and falls as it runs out: at least
   ``RIB_DESCENT_MM`` (8 mm) over its run, by no more than ``RIB_FALL_MAX`` mm per mm, with a medial slope within
   ``RIB_SLOPE`` (-0.9…-0.2 mm per mm): lumbar transverse processes end within ~15 mm; the sacral alae, the iliac
   wings and organ edges run flat, rise or drop steeply. Over its first ``RIB_AP_FIT_MM`` (30 mm) it runs more out
   than forward (\|AP change\| ≤ ``RIB_AP_SLOPE_MAX`` (1) mm per mm: a kidney's back edge runs forward), and a seed
   split off a transverse process must fall at least ``RIB_SPLIT_FALL_MM`` (2 mm) over its first ``RIB_EARLY_MM``
   (10 mm) and hold a median section of ``RIB_SPLIT_SECTION_MM2`` (90 mm²): a process's flat tip running onto an
   organ edge or the pelvis does neither (51 generator-v6 phantoms, seed 18000: the 4 true ribs from split seeds
   fall 5–9 mm with sections 116–162 mm², the 7 false traces from split seeds 52–68 mm², two of them falling under
   1 mm; ribs of unsplit seeds, 177 true, fall 2.1 mm or more, the real CT's left 12th rib 1.4 mm).
4. **Joint height.** The rib's z over its medial ``RIB_FIT_MM`` (20 mm) is fitted linearly in ``u`` and extrapolated
   to ``u = RIB_JOINT_MM`` (25 mm, the costovertebral joint at the body's side): the 11th and 12th ribs fall ~0.5 mm
   per mm laterally, so the z at u = 40 mm lies ~8 mm below the joint. Traces of one side whose medial z lie within
   ``RIB_SAME_MM`` (12 mm) are one rib. Left and right joints within ``PAIR_DZ_MM`` (15 mm) form a pair; pairs are
   ordered cranial → caudal and must be consecutive levels (a pair more than ``RIB_LEVEL_GAP_MM`` (48 mm) below the
   one above it ends the list); the lowest is the last rib-bearing level (T12 under the usual convention).
5. With ``body_centres_lps``, each pair is tied to the body whose centre is nearest in z, when it lies within
   ``RIB_TIE_FRACTION`` (0.4) × the median spacing of the bodies; otherwise (its body out of view or not detected)
   ``body_index`` stays None. (The measurement ties it in the sagittal image instead:
   :func:`bmd_d2.levels.assign_levels` through :func:`rib_level`.)
6. **Confidence** per pair: 1 with both sides, 0.6 with one; the anchor's is the lowest pair's, times 0.8 when only
   one pair is in view (the counting rule needs 0.6: a lone one-sided rib is reported, not counted from).

Ribs status (issue 18, session 10; phantoms cached before the issue-19 generator rewrite): on full-size phantoms
(``PhantomOptions()``) seeds 0–19 the lowest pair is at T12 on 20 of 20 (was 15, with 4 wrong lowest levels — seeds
10, 12, 17 at L5/S1, 19 at T11 with T12 missed — and seed 18 missed); held-out seeds 20–39: 16 at T12, 4 None, all
four with T12 out of view (was 9 right, 11 wrong: pelvis and processes traced as ribs). No wrong lowest level on the
40. The known risk left is a missed last rib with the one above found (the count then shifts up by one): it is a
``level_count_conflict`` when a sacrum (detected or 3-D) is found, not caught without one. On the real example CT one pair at T12
(joints z 419.9 / 414.5 mm inside T12's 385–427 mm); the 11th rib's joint is above the field of view.

Session 13 (held-out generator-v6 phantoms): ``tools/benchmark_levels.py`` seed 18000, last rib found on 87 of 100
studies (was 86), normal anatomy 471/471 levels named right (was 465 with 6 unnamed), no false conflict; with the
model (``tools/benchmark_accuracy.py``, seed 9000) 94 of 100 (was 92), every transitional study flagged (was 18 of
20: a 13th rib joined to L1's process, T11 ribs at the top of the field of view); two normal studies falsely
flagged by a one-sided trace below the T12 pair.

Speed (issue 18; full-size phantom seeds 0–19, 2 cores shared with a training job): find_ribs with
its coarse grid median 0.10 s, max 0.15 s CPU (was 0.18 / 0.31 s; 0.06 s on the 3 mm real CT); the grid is about
half of it (median 0.05 s), the rib mask and the tracing 0.035 s (max 0.06 s). The answers are those of the earlier
code, bit for bit (seeds 0–19 in float32 and int16, the real CT): the grey opening is OpenCV's per slice (the same
min/max), the lateral slabs are gathered once slab-major with one flat index, the seeds are screened on their
bounding box first and the running median of the sections is kept sorted. find_sacrum on the shared grid (session 12,
generator-v6 seeds 0–11, 2 cores shared with a benchmark): median 0.05 s, max 0.07 s; grid + ribs + sacrum median
0.16 s, max 0.22 s. Session 13: :func:`spine_grid` reuses the plane search's grid (``coarse_lps`` returns the grid
:func:`~bmd_d2.data.sagittal.find_midsagittal_plane` built for the same volume): ``tools/benchmark.py`` 10 studies,
anchors p50 0.081 s, max 0.166 s (p50 0.175, max 0.395 s in the same session before it).
"""
import bisect
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from bmd_d2.data.dicom import Volume
from bmd_d2.data.sagittal import SagittalPlane, coarse_lps
from bmd_d2.levels import RibLevel, SacrumLevel

__all__ = ["SacrumAnchor", "RibPair", "RibAnchor", "SpineGrid", "spine_grid", "find_sacrum", "find_ribs",
           "plane_of_sagittal", "rib_level", "sacrum_level"]

COARSE_MM = 2.0
BONE_HU = 150.0
ILIAC_MIN_AREA_MM2 = 150.0
SI_REACH_MM = 70.0
SI_ILIAC_MM = 60.0
SI_OUTER_MM = 170.0
SI_AP_MM = (-100.0, 100.0)
SI_SEED_HALF_MM = 12.0
SI_SEED_AP_MM = (-15.0, 35.0)
SI_MIN_RUN_MM = 20.0
SI_FULL_RUN_MM = 30.0
SI_FULL_REACH_MM = 100.0
RIB_INNER_MM = 40.0
RIB_OUTER_MM = 170.0
RIB_MIN_RUN_MM = 36.0
RIB_HU = 70.0
RIB_TOPHAT_HU = 40.0
RIB_TOPHAT_WEAK_HU = 20.0
RIB_OPEN_MM = 14.0
RIB_AP_MM = (-120.0, 90.0)
RIB_SEED_AP_MM = (15.0, 70.0)
RIB_SEED_MAX_MM = 24.0
RIB_TRACK_MM = 8.0
RIB_SECTION_MM2 = 48.0
RIB_SECTION_MIN_MM2 = 24.0
RIB_SECTION_FRACTION = 0.4
RIB_MAX_MISS = 1
RIB_FIT_MM = 20.0
RIB_JOINT_MM = 25.0
RIB_DESCENT_MM = 8.0
RIB_SLOPE = (-0.9, -0.2)
RIB_FALL_MAX = 1.05
RIB_AP_FIT_MM = 30.0
RIB_AP_SLOPE_MAX = 1.0
RIB_EARLY_MM = 10.0
RIB_SPLIT_FALL_MM = 2.0
RIB_SPLIT_SECTION_MM2 = 90.0
RIB_LEVEL_GAP_MM = 48.0
RIB_SAME_MM = 12.0
PAIR_DZ_MM = 15.0
RIB_TIE_FRACTION = 0.4


@dataclass
class SacrumAnchor:
    """The S1 superior endplate found from the pelvis.

    Attributes:
        point_lps: (x, y, z) mm, centre of the S1 superior endplate.
        z_mm: its LPS z (superior +).
        row_mm: its position along the sagittal plane's head → feet direction, mm from the plane's point.
        confidence: 0…1.
        evidence: what was seen (SI-joint z-range, wing width, blob height, disc found ...).
    """

    point_lps: List[float]
    z_mm: float
    row_mm: float
    confidence: float
    evidence: Dict = field(default_factory=dict)

    def to_dict(self) -> Dict:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class RibPair:
    """One rib-bearing level: the costovertebral joints found at one height.

    Attributes:
        z_mm: LPS z of the joint(s) (mean of the sides present).
        row_mm: position along the plane's head → feet direction.
        left, right: whether the rib of that side was traced.
        left_z_mm, right_z_mm: joint z per side (None when absent).
        body_index: index into ``body_centres_lps`` of the body it is tied to (None without bodies).
        confidence: 1 for a pair, 0.6 for a single rib.
        point_lps: (x, y, z) mm, the joints' height on the spine's centreline (mid-sagittal plane, body centre AP).
    """

    z_mm: float
    row_mm: float
    left: bool
    right: bool
    left_z_mm: Optional[float] = None
    right_z_mm: Optional[float] = None
    body_index: Optional[int] = None
    confidence: float = 1.0
    point_lps: Optional[List[float]] = None


@dataclass
class RibAnchor:
    """The ribs in view.

    Attributes:
        pairs: rib-bearing levels, cranial → caudal.
        lowest_z_mm, lowest_row_mm: the last (lowest) rib-bearing level (properties, from ``pairs``).
        n_pairs: number of rib-bearing levels in view (property).
        confidence: 0…1.
        evidence: ``ribs``: per traced rib its joint z, medial end, lateral run, slope, section and ``path_lps`` (the
            trace centre per 2 mm slab, LPS mm, medial → lateral); ``rejected``: traces of ≥ 10 mm not taken, and why.
    """

    pairs: List[RibPair]
    confidence: float
    evidence: Dict = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def lowest_z_mm(self) -> float:
        return self.pairs[-1].z_mm

    @property
    def lowest_row_mm(self) -> float:
        return self.pairs[-1].row_mm

    def to_dict(self) -> Dict:
        """JSON-ready dict (the derived ``lowest_z_mm``, ``lowest_row_mm`` and ``n_pairs`` included)."""
        return dict(asdict(self), lowest_z_mm=self.lowest_z_mm, lowest_row_mm=self.lowest_row_mm,
                    n_pairs=self.n_pairs)


@dataclass
class SpineGrid:
    """The coarse LPS grid and the spine frame shared by both anchors.

    Attributes:
        C: float32 (Z, Y, X) HU on the LPS-aligned grid (z ascending = superior).
        lo: (3,) LPS of ``C[0, 0, 0]``.
        step: grid step mm.
        plane: the mid-sagittal plane.
        yb: (Z,) body-centre y (LPS mm) per z row.
        xs, ys, zs: LPS coordinates of the grid axes.
    """

    C: np.ndarray
    lo: np.ndarray
    step: float
    plane: SagittalPlane
    yb: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    def x_mid(self, y, z):
        """Lateral midline x (LPS mm) at (y, z) (broadcast arrays)."""
        p, n = self.plane.point, self.plane.normal
        return p[0] - ((np.asarray(y) - p[1]) * n[1] + (np.asarray(z) - p[2]) * n[2]) / n[0]

    def row_mm(self, pt) -> float:
        """Position of an LPS point along the plane's head → feet direction (mm from the plane's point)."""
        return float(np.dot(np.asarray(pt, float) - self.plane.point, self.plane.row_dir))


def spine_grid(volume: Volume, plane: SagittalPlane) -> Optional[SpineGrid]:
    """The coarse grid and spine frame, or None when the plane is a fallback or has no centreline."""
    cl = plane.info.get("centreline") or []
    if plane.info.get("method") != "symmetry" or not cl or abs(plane.normal[0]) < 0.5:
        return None
    C, lo, step = coarse_lps(volume, COARSE_MM)
    Z, Y, X = C.shape
    zs = lo[2] + step * np.arange(Z)
    cl = np.asarray(cl, float)
    order = np.argsort(cl[:, 2])
    yb = np.interp(zs, cl[order, 2], cl[order, 1])
    return SpineGrid(C=C, lo=lo, step=step, plane=plane, yb=yb, xs=lo[0] + step * np.arange(X),
                     ys=lo[1] + step * np.arange(Y), zs=zs)


def _joined_slices(g: SpineGrid) -> np.ndarray:
    """Per z row of the grid: (left reach, right reach, left area, right area) of the bone joined to the sacral body
    in that axial slice (mm, mm², see :func:`find_sacrum` step 1); zeros where no bone touches the seed."""
    import cv2

    st = g.step
    Z = len(g.zs)
    dy = g.ys[None, :] - g.yb[:, None]
    out = np.zeros((Z, 4))
    kernel = np.ones((3, 3), np.uint8)
    for z in range(Z):
        u = g.xs[None, :] - g.x_mid(g.ys[:, None], g.zs[z])  # (Y, X)
        win = ((dy[z] >= SI_AP_MM[0]) & (dy[z] <= SI_AP_MM[1]))[:, None] & (np.abs(u) <= SI_OUTER_MM)
        b = (g.C[z] >= BONE_HU) & win
        if not b.any():
            continue
        closed = cv2.morphologyEx(b.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        _, lab = cv2.connectedComponents(closed, connectivity=8)
        seed = (np.abs(u) <= SI_SEED_HALF_MM) & ((dy[z] >= SI_SEED_AP_MM[0]) & (dy[z] <= SI_SEED_AP_MM[1]))[:, None]
        ids = np.unique(lab[seed & (closed > 0)])
        ids = ids[ids > 0]
        if not len(ids):
            continue
        um = u[np.isin(lab, ids)]
        out[z] = [um.max(), -um.min(), (um >= SI_ILIAC_MM).sum() * st * st, (um <= -SI_ILIAC_MM).sum() * st * st]
    return out


def find_sacrum(volume: Volume, plane: SagittalPlane, grid: Optional[SpineGrid] = None) -> Optional[SacrumAnchor]:
    """The top of the sacrum from its sacroiliac joints (method in the module docstring); None when no pelvis joined
    to the spine is in view.

    Args:
        volume: HU volume.
        plane: its mid-sagittal plane (:func:`~bmd_d2.data.sagittal.find_midsagittal_plane`).
        grid: a precomputed :func:`spine_grid` (shared with :func:`find_ribs`); None builds it.

    Returns:
        :class:`SacrumAnchor` or None.
    """
    g = grid if grid is not None else spine_grid(volume, plane)
    if g is None:
        return None
    st = g.step
    prof = _joined_slices(g)
    joined = (prof[:, 0] >= SI_REACH_MM) & (prof[:, 1] >= SI_REACH_MM) & \
        (prof[:, 2] >= ILIAC_MIN_AREA_MM2) & (prof[:, 3] >= ILIAC_MIN_AREA_MM2)
    # runs of joined slices, single missing rows bridged
    runs: List[Tuple[int, int]] = []
    for z in np.nonzero(joined)[0]:
        if runs and z - runs[-1][1] <= 2:
            runs[-1] = (runs[-1][0], int(z))
        else:
            runs.append((int(z), int(z)))
    if not runs:
        return None
    lo, hi = max(runs, key=lambda r: (r[1] - r[0], r[1]))
    length = (hi - lo + 1) * st
    if length < SI_MIN_RUN_MM:
        return None
    seg = prof[lo:hi + 1][joined[lo:hi + 1]]
    reach = float(np.median(np.minimum(seg[:, 0], seg[:, 1])))
    top_cut = hi >= len(g.zs) - 2  # the joints run out of the field of view at the top: their top is not seen
    conf = min(1.0, length / SI_FULL_RUN_MM) * (0.6 + 0.4 * min(1.0, reach / SI_FULL_REACH_MM))
    conf *= 0.5 if top_cut else 1.0
    zc = float(g.zs[hi] + st / 2)
    yc = float(g.yb[hi])
    point = np.array([float(g.x_mid(yc, zc)), yc, zc])
    evidence = dict(si_joint_z_mm=[float(g.zs[lo]), float(g.zs[hi])], si_joint_length_mm=float(length),
                    si_joint_reach_mm=reach, joined_slices=int(joined[lo:hi + 1].sum()),
                    other_runs_mm=[[float(g.zs[a]), float(g.zs[b])] for a, b in runs if (a, b) != (lo, hi)],
                    top_out_of_view=bool(top_cut))
    return SacrumAnchor(point_lps=[float(v) for v in point], z_mm=zc, row_mm=g.row_mm(point),
                        confidence=float(np.clip(conf, 0.0, 1.0)), evidence=evidence)


def _rib_mask(g: SpineGrid) -> Tuple[np.ndarray, int]:
    """Thin bright structures in the ribs' AP window: ``C >= RIB_HU`` and at least ``RIB_TOPHAT_HU`` above the grey
    opening of ``max(C, 0)`` by a ``RIB_OPEN_MM`` in-plane box (a rib, 10 mm thick, does not hold the box; a kidney,
    the liver or a vertebral body does, so their interiors drop out whatever their HU). Returns (mask (Z, Yw, X) uint8,
    y0): 2 where that holds, 1 where only the weaker ``RIB_TOPHAT_WEAK_HU`` does (a rib running along the liver or a
    kidney: the trace may continue there), 0 elsewhere; the rows ``y0 : y0 + Yw`` of the grid that the window covers."""
    import cv2

    dy = g.ys[None, :] - g.yb[:, None]
    rows = np.nonzero(((dy >= RIB_AP_MM[0]) & (dy <= RIB_AP_MM[1])).any(0))[0]
    if not len(rows):
        return np.zeros((len(g.zs), 0, len(g.xs)), np.uint8), 0
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    n = max(3, int(round(RIB_OPEN_MM / g.step)) | 1)
    box = np.ones((n, n), np.uint8)
    out = np.empty((len(g.zs), y1 - y0, len(g.xs)), np.uint8)
    for z in range(len(g.zs)):
        # per axial slice: OpenCV's flat-box opening is scipy's grey_opening(size=(1, n, n)) (min/max over the part
        # of the box inside the image: identical values), ~10x faster
        raw = g.C[z, y0:y1]
        C = np.maximum(raw, np.float32(0.0))
        th = C - cv2.morphologyEx(C, cv2.MORPH_OPEN, box)
        bright = raw >= RIB_HU
        np.add(bright & (th >= RIB_TOPHAT_WEAK_HU), bright & (th >= RIB_TOPHAT_HU), out=out[z], dtype=np.uint8)
    return out, y0


def _rib_seeds(S3: np.ndarray, dyb: np.ndarray, st: float) -> List[Tuple[float, float, float, bool]]:
    """Rib seeds in the first three lateral slabs ``S3`` (3, Z, Yw) (module docstring, step 2): (z, y) pixel centre
    and AP offset (mm) of each blob of their union no taller or deeper than ``RIB_SEED_MAX_MM`` whose centre lies
    ``RIB_SEED_AP_MM`` behind the body, and whether it was split: a taller union blob (a 13th rib still joined to L1's
    transverse process, which ends at u 40–45 mm) is split into the blobs of each slab alone inside it that pass (one
    per rib: a second within ``RIB_TRACK_MM`` of one already taken is the same); so is a blob touching the top or
    bottom of the field of view (a rib near the top joined there to other bone), whose split blobs must not."""
    Z = S3.shape[1]
    ones = np.ones((3, 3), bool)

    def blobs(img):
        lab, _ = ndimage.label(img, structure=ones)
        for k_, box in enumerate(ndimage.find_objects(lab), 1):
            if box is not None:
                yield lab, k_, box

    def accept(lab, k_, box, oz=0, oy=0):
        # (seed or None, whether to split it): the bounding box first (most blobs fail on it), then the mean AP
        # position; (oz, oy): the offset of ``lab``
        (za, zb), (ya, yb_) = (box[0].start + oz, box[0].stop + oz), (box[1].start + oy, box[1].stop + oy)
        edge = za < 1 or zb - 1 > Z - 2  # touching the top or bottom of the field of view
        if edge or (zb - za) * st > RIB_SEED_MAX_MM or (yb_ - ya) * st > RIB_SEED_MAX_MM:
            return None, True
        bz, by = np.nonzero(lab[box] == k_)
        bz, by = bz + za, by + ya
        ap = float(dyb[bz, by].mean())
        if not RIB_SEED_AP_MM[0] <= ap <= RIB_SEED_AP_MM[1]:
            return None, False
        return (float(bz.mean()), float(by.mean()), ap), False

    seeds: List[Tuple[float, float, float, bool]] = []
    for lab, k_, box in blobs(S3.any(0)):
        seed, splittable = accept(lab, k_, box)
        if seed is not None:
            seeds.append(seed + (False,))
        elif splittable:
            inside = lab[box] == k_
            split: List[Tuple[float, float, float]] = []
            for k in range(len(S3)):
                for lab_k, j, b in blobs(S3[k][box] & inside):
                    sk, _ = accept(lab_k, j, b, box[0].start, box[1].start)
                    if sk is None:
                        continue
                    if all(math.hypot(sk[0] - q[0], sk[1] - q[1]) * st > RIB_TRACK_MM for q in split):
                        split.append(sk)
            seeds += [q + (True,) for q in split]
    return seeds


def _trace_ribs(g: SpineGrid, M: np.ndarray, y0: int, side: float) -> Tuple[List[Dict], List[Dict]]:
    """Ribs of one side traced outward through the lateral slabs of the rib mask (method in the module docstring).
    Returns (ribs, rejected traces of at least 10 mm with the reason: too short, course, slope)."""
    st = g.step
    Z, Yw, X = M.shape
    ys = g.ys[y0:y0 + Yw]
    xm = g.x_mid(ys[None, :], g.zs[:, None])  # (Z, Yw)
    ks = np.arange(int(round(RIB_INNER_MM / st)), int(round(RIB_OUTER_MM / st)) + 1)
    K = len(ks)
    # column of M at u = ks[k] * st: ci[k, z, y] = rint((xm + side * ks * st - lo_x) / st), built in place (the same
    # float operations in the same order as one expression) and gathered from M padded with a zero column each side
    # (a column outside the grid reads 0), slab-major so each slab (Z, Yw) is contiguous
    ci = np.add((side * ks * st)[:, None, None], xm[None])
    ci -= g.lo[0]
    ci /= st
    np.rint(ci, out=ci)
    np.clip(ci, -1.0, float(X), out=ci)
    ci += (np.arange(Z)[:, None] * Yw + np.arange(Yw)[None, :]) * (X + 2) + 1.0
    Mp = np.zeros((Z, Yw, X + 2), np.uint8)
    Mp[:, :, 1:-1] = M
    Sc = Mp.ravel().take(ci.astype(np.intp))  # Sc[k, z, y]: mask code at u = ks[k] * st
    S, Sw = Sc >= 2, Sc >= 1
    dyb = ys[None, :] - g.yb[:, None]
    r_px = RIB_TRACK_MM / st
    r2 = r_px ** 2
    out = []
    short = []
    for cz, cy, ap, split in _rib_seeds(S[:3], dyb, st):
        vz = vy = 0.0
        track = []
        sections: List[int] = []  # the track's sections (pixels), sorted: its running median
        need = RIB_SECTION_MM2
        miss = 0
        for k in range(K):
            pz, py = cz + vz, cy + vy
            z0_, z1_ = max(int(pz - r_px - 1), 0), min(int(pz + r_px + 2), Z)
            w0, w1 = max(int(py - r_px - 1), 0), min(int(py + r_px + 2), Yw)
            if z1_ <= z0_ or w1 <= w0:
                break
            disc = (np.arange(z0_, z1_) - pz)[:, None] ** 2 + (np.arange(w0, w1) - py)[None, :] ** 2 <= r2
            sub = (S if len(track) < 3 else Sw)[k, z0_:z1_, w0:w1] & disc
            cnt = int(np.count_nonzero(sub))
            # a rib thins and turns as it runs out: past its first slabs a fraction of its median section holds
            if cnt * st * st < need:
                miss += 1
                if miss > RIB_MAX_MISS and track:
                    break
                if not track and k >= 3:
                    break
                continue
            miss = 0
            sz, sy = np.nonzero(sub)
            nz, ny = float(sz.sum() / cnt + z0_), float(sy.sum() / cnt + w0)
            if track:
                dk = k - track[-1][0]
                vz = 0.5 * vz + 0.5 * (nz - track[-1][1]) / dk
                vy = 0.5 * vy + 0.5 * (ny - track[-1][2]) / dk
            cz, cy = nz, ny
            track.append((k, nz, ny, cnt))
            bisect.insort(sections, cnt)
            if len(track) >= 3:
                h = len(sections) // 2
                med = sections[h] if len(sections) % 2 else (sections[h - 1] + sections[h]) / 2
                need = max(RIB_SECTION_MIN_MM2, RIB_SECTION_FRACTION * float(med) * st * st)
        if not track:
            continue
        t = np.asarray(track, float)
        run = (t[-1, 0] - t[0, 0] + 1) * st
        if run < RIB_MIN_RUN_MM:
            if run >= 10.0:
                short.append(dict(medial_z_mm=float(g.lo[2] + st * t[0, 1]), run_mm=float(run), medial_ap_mm=ap,
                                  reason="short"))
            continue
        u = ks[t[:, 0].astype(int)] * st
        zt = g.lo[2] + st * t[:, 1]
        yt = g.lo[1] + st * (t[:, 2] + y0)
        path = np.stack([g.x_mid(yt, zt) + side * u, yt, zt], 1)  # the trace's centre per slab, LPS mm
        near = u <= u[0] + RIB_FIT_MM
        slope = float(np.polyfit(u[near], zt[near], 1)[0]) if near.sum() >= 3 else 0.0
        fall = float(zt[-1] - zt[0]) / run
        if not (RIB_SLOPE[0] <= slope <= RIB_SLOPE[1] and -RIB_FALL_MAX <= fall):
            # the 11th/12th ribs fall ~0.5 mm per mm from the joint; flat, rising or steep traces are processes,
            # the pelvis or organ edges
            short.append(dict(medial_z_mm=float(zt[0]), run_mm=float(run), medial_ap_mm=ap, reason="slope",
                              slope=slope, fall=float(fall)))
            continue
        z_joint = float(zt[near].mean() + slope * (RIB_JOINT_MM - u[near].mean()))
        apt = yt - np.interp(zt, g.zs, g.yb)
        far = u <= u[0] + RIB_AP_FIT_MM
        ap_slope = float(apt[far][-1] - apt[0]) / max(float(u[far][-1] - u[0]), st)
        early = float(np.interp(u[0] + RIB_EARLY_MM, u, zt) - zt[0])
        section = float(np.median(t[:, 3]) * st * st)
        if zt[-1] - zt[0] > -RIB_DESCENT_MM or abs(ap_slope) > RIB_AP_SLOPE_MAX or \
                (split and (early > -RIB_SPLIT_FALL_MM or section < RIB_SPLIT_SECTION_MM2)):
            # the lower ribs fall as they run out, and run more out than forward; processes and the pelvis do not
            # fall, organ edges (a kidney's back) run forward; a seed split off a transverse process must fall from
            # its first slab and hold a rib's full section (the process's tip, running onto an organ edge, does not)
            short.append(dict(medial_z_mm=float(zt[0]), run_mm=float(run), medial_ap_mm=ap, reason="course",
                              lateral_ap_mm=float(apt[-1]), lateral_dz_mm=float(zt[-1] - zt[0]),
                              ap_slope=ap_slope, early_dz_mm=early, split_seed=bool(split), section_mm2=section))
            continue
        out.append(dict(z_mm=z_joint, medial_z_mm=float(zt[0]), medial_mm=float(u[0]), run_mm=float(run),
                        slope=slope, medial_ap_mm=ap, section_mm2=section,
                        lateral_ap_mm=float(apt[-1]), lateral_dz_mm=float(zt[-1] - zt[0]),
                        ap_slope=ap_slope, early_dz_mm=early, split_seed=bool(split),
                        path_lps=np.round(path, 1).tolist()))
    # one rib per height: seeds split by noise trace the same rib
    out.sort(key=lambda r: -r["run_mm"])
    kept: List[Dict] = []
    for r in out:
        if all(abs(r["medial_z_mm"] - q["medial_z_mm"]) > RIB_SAME_MM for q in kept):
            kept.append(r)
    return kept, short


def find_ribs(volume: Volume, plane: SagittalPlane, body_centres_lps: Optional[Sequence[Sequence[float]]] = None,
              grid: Optional[SpineGrid] = None, sacrum: Optional[SacrumAnchor] = None) -> Optional[RibAnchor]:
    """The rib-bearing levels in view (method in the module docstring); None when no rib is in view.

    Args:
        volume: HU volume.
        plane: its mid-sagittal plane.
        body_centres_lps: optional detected body centres (N, 3) LPS mm; each rib pair is tied to one by index.
        grid: a precomputed :func:`spine_grid`; None builds it.
        sacrum: the sacrum anchor, if found: bone below it (iliac wings) is not searched.

    Returns:
        :class:`RibAnchor` or None.
    """
    g = grid if grid is not None else spine_grid(volume, plane)
    if g is None:
        return None
    M, y0 = _rib_mask(g)
    if sacrum is not None:
        M[g.zs < sacrum.z_mm + 30.0] = False
    ribs, rejected = [], []
    for side, name in ((1.0, "left"), (-1.0, "right")):
        kept, short = _trace_ribs(g, M, y0, side)
        for r in kept + short:
            r["side"] = name
        ribs += kept
        rejected += short
    if not ribs:
        return None
    ribs.sort(key=lambda r: -r["z_mm"])
    pairs: List[RibPair] = []
    for r in ribs:
        p = next((q for q in pairs if not getattr(q, r["side"]) and abs(q.z_mm - r["z_mm"]) <= PAIR_DZ_MM), None)
        if p is None:
            p = RibPair(z_mm=r["z_mm"], row_mm=0.0, left=False, right=False)
            pairs.append(p)
        setattr(p, r["side"], True)
        setattr(p, r["side"] + "_z_mm", r["z_mm"])
        zs_ = [v for v in (p.left_z_mm, p.right_z_mm) if v is not None]
        p.z_mm = float(np.mean(zs_))
    pairs.sort(key=lambda q: -q.z_mm)
    # rib-bearing levels are consecutive: a level more than RIB_LEVEL_GAP_MM below the one above it is not a rib
    for k in range(1, len(pairs)):
        if pairs[k - 1].z_mm - pairs[k].z_mm > RIB_LEVEL_GAP_MM:
            pairs = pairs[:k]
            break
    bodies = np.asarray(body_centres_lps, float).reshape(-1, 3) if body_centres_lps is not None else None
    for p in pairs:
        xm = float(g.x_mid(np.interp(p.z_mm, g.zs, g.yb), p.z_mm))
        pt = np.array([xm, float(np.interp(p.z_mm, g.zs, g.yb)), p.z_mm])
        p.row_mm = g.row_mm(pt)
        p.point_lps = [float(v) for v in pt]
        p.confidence = 1.0 if (p.left and p.right) else 0.6
        if bodies is not None and len(bodies):
            dz = np.abs(bodies[:, 2] - p.z_mm)
            gap = float(np.median(np.diff(np.sort(bodies[:, 2])))) if len(bodies) > 1 else 30.0
            if dz.min() <= RIB_TIE_FRACTION * gap:  # no body within reach: its body is out of view or undetected
                p.body_index = int(np.argmin(dz))
    low = pairs[-1]
    conf = low.confidence * (0.8 if len(pairs) == 1 else 1.0)
    return RibAnchor(pairs=pairs, confidence=float(conf), evidence=dict(ribs=ribs, rejected=rejected))


def plane_of_sagittal(sagittal) -> Optional[SagittalPlane]:
    """The mid-sagittal plane a ``SagittalImage`` was cut along, rebuilt from its ``info`` and ``transform`` (no
    second plane search); None when the image does not record one."""
    info = getattr(sagittal, "info", None) or {}
    fit, point, normal = info.get("plane"), info.get("plane_point"), info.get("plane_normal")
    if not isinstance(fit, dict) or point is None or normal is None:
        return None
    T = np.asarray(sagittal.transform, float)
    col, row = T[:3, 0] / np.linalg.norm(T[:3, 0]), T[:3, 1] / np.linalg.norm(T[:3, 1])
    return SagittalPlane(point=np.asarray(point, float), normal=np.asarray(normal, float), col_dir=col, row_dir=row,
                         info=dict(fit))


def rib_level(ribs: RibAnchor, sagittal) -> RibLevel:
    """The rib anchor as the counting rule (:func:`bmd_d2.levels.assign_levels`) takes it: the lowest rib-bearing
    level's sagittal row (pixels), the number of rib-bearing levels and the confidence."""
    row = float(sagittal.lps_to_pixel(np.asarray(ribs.pairs[-1].point_lps, float))[1])
    return RibLevel(row=row, n_pairs=ribs.n_pairs, confidence=ribs.confidence)


def sacrum_level(sacrum: SacrumAnchor, sagittal) -> SacrumLevel:
    """The 3-D sacrum as the counting rule takes it: the sagittal row (pixels) of the top of its sacroiliac joints,
    and its confidence."""
    row = float(sagittal.lps_to_pixel(np.asarray(sacrum.point_lps, float))[1])
    return SacrumLevel(row=row, confidence=sacrum.confidence)
