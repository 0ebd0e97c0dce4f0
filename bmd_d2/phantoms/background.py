"""The soft-tissue background of a study: body outline, abdominal wall, viscera, organs, vessels, muscles, iliac
wings and the patient table.

Soft tissue has no detail finer than ~1.6 mm here, so it is rendered on anchor slices every ~8 mm at ≤ 1.6 mm pixels,
upsampled bilinearly in-plane and interpolated linearly in z (a 512² × 300 study's background takes a fraction of a
second).
"""
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .anatomy import Layout, bone_hu, ilium_x
from .geometry import Grid, ramp, superellipse_d

_ANCHOR_STEP_MM = 8.0


class _Canvas:
    """One low-resolution anchor slice being painted: pixel centres ``X`` (1, mi), ``Y`` (mj, 1) in LPS mm.

    Attributes:
        img: float32 ``(mj, mi)`` HU of the slice being painted.
        px: low-resolution pixel size (mm).
    """

    def __init__(self, g: Grid):
        _, nj, ni = g.shape
        ps = float(g.sp[0])
        f = max(1, int(1.25 / ps + 0.5))
        self.mj, self.mi = -(-nj // f), -(-ni // f)
        self.px = ps * ni / self.mi
        self.X = (g.origin[0] + ((np.arange(self.mi) + 0.5) * ni / self.mi - 0.5) * ps).astype(np.float32)[None, :]
        self.Y = (g.origin[1] + ((np.arange(self.mj) + 0.5) * nj / self.mj - 0.5) * g.sp[1]).astype(np.float32)[:, None]
        self.img = np.empty((self.mj, self.mi), np.float32)

    def cover(self, frac, value) -> None:
        """Composite ``value`` with coverage ``frac`` (the whole slice) over the slice."""
        self.img += frac * (value - self.img)

    def ellipse(self, cx, cy, a, b, value, pw=2.0, within=None) -> None:
        """Paint a soft-edged superellipse, computing only in its bounding box; ``within`` masks its coverage."""
        X, Y, px = self.X, self.Y, self.px
        j0 = max(int((cy - b - 2 * px - Y[0, 0]) / px), 0)
        j1 = min(int((cy + b + 2 * px - Y[0, 0]) / px) + 2, self.mj)
        i0 = max(int((cx - a - 2 * px - X[0, 0]) / px), 0)
        i1 = min(int((cx + a + 2 * px - X[0, 0]) / px) + 2, self.mi)
        if j1 <= j0 or i1 <= i0 or a <= 0 or b <= 0:
            return
        sub = (slice(j0, j1), slice(i0, i1))
        fr_ = ramp(superellipse_d(X[:, sub[1]] - cx, Y[sub[0]] - cy, a, b, pw), px)
        if within is not None:
            fr_ = fr_ * within[sub]
        self.img[sub] += fr_ * (value - self.img[sub])


class _Anchor:
    """Paints anchor slices of one study, structure by structure, in a fixed order."""

    def __init__(self, lay: Layout, p: dict, canvas: _Canvas):
        self.p, self.cv = p, canvas
        self.bx, self.by = lay.body_c
        zc = [c[2] for c in lay.fr["center"]]
        self.ilium_x = ilium_x(p, lay.fr) if p.get("pelvis") == "sacroiliac" else None
        self.z_t12, self.z_l2, self.z_l4, self.z_s1 = zc[1], zc[3], zc[5], zc[7]

    def paint(self, z: float, spine: Sequence[float], fields: Sequence[np.ndarray]) -> None:
        """Paint the slice at height ``z``; ``spine`` = (x, y, half-depth, half-width) of the spine axis there,
        ``fields`` = the visceral, texture and gas random fields upsampled to the canvas."""
        p = self.p
        hip = float(np.clip((self.z_l4 - z) / 80.0, 0.0, 1.0))  # pelvis widens the body caudally
        A = p["body_half_width"] * (1.0 + 0.08 * hip)
        B = p["body_half_depth"] * (1.0 - 0.05 * hip)
        inside, cav = self._trunk(A, B, spine[1], fields)
        self._organs_and_muscles(z, A, B, spine, inside, cav)
        self._vessels(z, spine)
        self._iliac_wings(z, spine)
        if p["table"]:
            self._table(B)

    def _trunk(self, A, B, sy, fields):
        """Body outline in fat, the abdominal-wall muscle ring and the visceral soup with gas; (inside, cavity)."""
        cv, p = self.cv, self.p
        v = cv.Y - self.by
        dbody = superellipse_d(cv.X - self.bx, v, A, np.where(v > 0, B * 0.96, B), 2.3)
        inside = ramp(dbody, cv.px)
        cv.img[...] = -1000.0 + inside * (p["fat_hu"] + 1000.0)
        t_f = p["subcut_fat_mm"]
        wall = ramp(dbody + t_f, cv.px)
        self.wall = wall  # under the subcutaneous fat (v6: the iliac wings stay inside it)
        cav = ramp(dbody + t_f + 12.0, cv.px)
        fld, tex, gas = fields
        organ = np.clip((fld - (p["visceral_fat"] * 2 - 1.0) * 0.5) * 3.0 + 0.5, 0, 1)  # 1 = soft organ
        soup = p["fat_hu"] + organ * (p.get("organ_hu", 40.0) - p["fat_hu"]) + 6.0 * tex
        gas_m = np.clip((gas - 1.6) * 4.0, 0, 1) * (v < (sy - self.by) - 45.0)
        soup += gas_m * (p.get("gas_hu", -950.0) - soup)
        cv.cover(wall - cav, p["muscle_hu"])  # abdominal wall muscle ring
        cv.cover(cav, soup)
        return inside, cav

    def _organs_and_muscles(self, z, A, B, spine, inside, cav):
        """Liver (patient right = -x), kidneys, erector spinae and psoas (which grows caudally)."""
        cv, p = self.cv, self.p
        sx, sy, sdep, swid = spine
        if z > self.z_l2:
            lv = float(np.clip((z - self.z_l2) / 40.0, 0, 1))
            cv.ellipse(self.bx - 0.45 * A, self.by - 0.05 * B, 0.5 * A * lv, 0.6 * B * lv, p["liver_hu"], within=cav)
        kz = float(np.clip(1.0 - ((z - 0.5 * (self.z_t12 + self.z_l2)) / 55.0) ** 2, 0.0, 1.0))
        for side in (-1, 1):
            if kz > 0:
                cv.ellipse(sx + side * (swid + 45.0), sy + 5.0, 28 * math.sqrt(kz), 20 * math.sqrt(kz), p["kidney_hu"])
            cv.ellipse(sx + side * 27.0 * p["size"], sy + sdep + 45.0, 21.0 * p["size"], 24.0 * p["size"],
                       p["muscle_hu"] + 5.0, 2.2, within=inside)
            rp = 6.0 + 16.0 * float(np.clip((self.z_t12 - z) / max(self.z_t12 - self.z_s1, 1.0), 0, 1))
            cv.ellipse(sx + side * (swid + rp * 0.7), sy - 2.0, rp, rp * 0.8, p["muscle_hu"])

    def _vessels(self, z, spine):
        """Aorta (bifurcating at L4) and inferior vena cava, anterior to the spine."""
        cv, p = self.cv, self.p
        sx, sy, sdep, _ = spine
        ya = sy - sdep - p["aorta_radius"] - 3.0
        if z > self.z_l4:
            cv.ellipse(sx + 14.0, ya, p["aorta_radius"], p["aorta_radius"], p["aorta_hu"])
        else:
            off = 10.0 + 0.5 * (self.z_l4 - z)
            for side in (-1, 1):
                cv.ellipse(sx + side * off, ya + 0.2 * (self.z_l4 - z), 6.5, 6.5, p["aorta_hu"])
        ivc_hu = p.get("ivc_hu", 0.6 * p["aorta_hu"] + 15.0 if p["contrast"] else 40.0)
        cv.ellipse(sx - 20.0, ya - 2.0, 12.0, 8.0, ivc_hu)

    def _iliac_wings(self, z, spine):
        """Curved cortical plates lateral to L5/S1, below the iliac crest."""
        cv, p = self.cv, self.p
        sx, sy, _, swid = spine
        crest = self.z_l4 - 10.0
        if z >= crest:
            return
        depth_in = float(np.clip((crest - z) / 40.0, 0.0, 1.0))
        bone = bone_hu(p, 1.1 * p["bmd_mg_cm3"] + 300.0, "cortical")
        r0 = 30.0 + 15 * depth_in
        for side in (-1, 1):
            if self.ilium_x is None:
                cx_, cut = sx + side * (swid + 45.0), 15.0
            else:  # v6: the arc opens wider and its posterior-medial tip meets the posterior ilium at the SI joint
                cx_, cut = sx + side * (self.ilium_x + 0.9 * r0), 0.9 * r0
            rr = np.sqrt((cv.X - cx_) ** 2 + ((cv.Y - (sy + 10.0)) / 1.4) ** 2)
            band = ramp(np.abs(rr - r0) - (2.5 + 4.0 * depth_in), cv.px)
            band = band * ((side * (cv.X - cx_)) > -cut)
            if self.ilium_x is not None:
                band = band * self.wall
            cv.cover(band, bone)

    def _table(self, B):
        """Curved carbon-fibre table with a foam core below the back."""
        cv = self.cv
        yt = self.by + B * 0.96 + 1.0 + 0.0006 * (cv.X - self.bx) ** 2
        on = np.abs(cv.X - self.bx) < 230
        for (t0, t1, hu) in ((0.0, 4.0, 250.0), (4.0, 40.0, -900.0), (40.0, 44.0, 250.0)):
            band = ramp(yt + t0 - cv.Y, cv.px) * ramp(cv.Y - (yt + t1), cv.px) * on
            cv.cover(band, hu)


def render_background(lay: Layout, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue, organs, vessels, muscles, table, iliac wings of a study.

    Args:
        lay: the study's layout (grid, spine frames, body centre).
        p: the study's parameters (:func:`~bmd_d2.phantoms.anatomy.draw_params`).
        rng: the image stream (its first draws: the random fields of the viscera and gas).

    Returns:
        float32 ``(K, J, I)`` HU volume.
    """
    import cv2

    g = lay.g
    nk, nj, ni = g.shape
    z0, z1 = float(g.z[0]), float(g.z[-1])
    na = max(2, int(math.ceil((z1 - z0) / _ANCHOR_STEP_MM)) + 1)
    az = np.linspace(z0, z1, na)
    cv = _Canvas(g)
    # smooth random fields for visceral soup / gas (coarse → bilinear upsampling)
    coarse = rng.standard_normal((na, 2, 20, 20)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, (0.8, 0, 1.0, 1.0))
    gas_c = rng.standard_normal((na, 12, 12)).astype(np.float32)
    spine = lay.spine_xy(az)
    painter = _Anchor(lay, p, cv)
    anchors = np.empty((na, nj, ni), np.float32)
    for a in range(na):
        fields = [cv2.resize(c, (cv.mi, cv.mj), interpolation=cv2.INTER_LINEAR)
                  for c in (coarse[a, 0], coarse[a, 1], gas_c[a])]
        painter.paint(az[a], [s[a] for s in spine], fields)
        cv2.resize(cv.img, (ni, nj), dst=anchors[a], interpolation=cv2.INTER_LINEAR)
    # interpolate anchors → slices
    vol = np.empty((nk, nj, ni), np.float32)
    seg = np.clip(np.searchsorted(az, g.z, side="right") - 1, 0, na - 2)
    for k in range(nk):
        a0 = int(seg[k])
        t = float(min(max((g.z[k] - az[a0]) / (az[a0 + 1] - az[a0]), 0.0), 1.0))
        cv2.addWeighted(anchors[a0], 1.0 - t, anchors[a0 + 1], t, 0.0, dst=vol[k])
    return vol
