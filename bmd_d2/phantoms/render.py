"""The spine of a study (discs, canal, posterior elements, ribs, sacrum, vertebral bodies, metal) and the scanner's
physics (PSF and correlated noise), painted into the background volume.

Speed: vertebrae are rendered in small boxes around each structure (:class:`~bmd_d2.phantoms.geometry.Grid`), and
the noise comes from a bank of pre-filtered noise slices, so a 512² × 300 study renders in a few seconds on one core.
"""
import math
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

from bmd_d2.levels import LEVEL_TO_LABEL, LEVELS

from .anatomy import Layout, ala_reach, bone_hu, fused_segments, ilium_x, level_bmd, level_frame
from .geometry import body_fracs, ellipsoid_frac, local_texture, paint, ramp, superellipse_d, texture

# Transverse-process length (mm) per level.
_TP_LENGTH = {"T11": 8.0, "T12": 9.0, "L1": 13.0, "L2": 16.0, "L3": 18.0, "L4": 16.0, "L5": 15.0, "S1": 26.0}


class SpineRenderer:
    """Paints the spine of one study into a volume and keeps its bookkeeping.

    Attributes (after :meth:`render`):
        level_info: per level: ``bmd``, ``fractured``, ``in_view`` (fraction of its height scanned), ``center``,
            ``height_mm``, ``depth_mm``, ``width_mm``.
        level_boxes: per level rendered, its index box (k, j, i slices).
        region: ``(3, 2)`` index bounds of everything rendered in 3-D (for the PSF), or None.
    """

    def __init__(self, lay: Layout, p: Dict, rng: np.random.Generator):
        self.g, self.fr, self.p, self.rng = lay.g, lay.fr, p, rng
        self.region = None
        self.level_boxes: Dict = {}
        self.level_info: Dict = {}
        self.metal_segments: List[Tuple] = []
        self.si_joints: Dict = {}

    def calib(self, dens, kind: str = "cortical", level: int = 0):
        """HU of bone of mineral density ``dens`` (mg/cm³) on this study's scanner: one line for every bone in v4;
        in v5 the physics line of ``kind`` (``"cortical"``, ``"trabecular"`` of ``level``, ``"marrow"``), before the
        scanner's gain/offset (:func:`~bmd_d2.phantoms.anatomy.bone_hu`)."""
        return bone_hu(self.p, dens, kind, level)

    def _grow(self, sl):
        if sl is None:
            return
        b = np.array([[s.start, s.stop] for s in sl])
        self.region = b if self.region is None else np.stack([np.minimum(self.region[:, 0], b[:, 0]),
                                                              np.maximum(self.region[:, 1], b[:, 1])], 1)

    def render(self, vol, labels, cores) -> None:
        """Paint every spine structure into ``vol`` (float32 ``(K, J, I)`` HU) and the levels seen into the uint8
        ``labels`` / ``cores`` volumes, in place; discs first (bodies overlap them), metal last."""
        self.metal_segments = self._metal_segments() if self.p["metal"] else []
        self._discs(vol)
        self._canal(vol)
        # posterior elements and ribs before the bodies, so that nothing but metal covers a trabecular core
        for i in range(len(LEVELS)):
            self._posterior(vol, i)
        self._ribs(vol)
        self._sacrum(vol)
        if self.p.get("pelvis") == "sacroiliac":
            self._pelvis(vol)
        z_lo, z_hi = self.g.z[0] - self.g.sp[2] / 2, self.g.z[-1] + self.g.sp[2] / 2
        for i, name in enumerate(LEVELS):
            self._body(vol, labels, cores, i, name, z_lo, z_hi)
        self._metal(vol)

    def _discs(self, vol):
        """Intervertebral discs: a superellipse cylinder between adjacent endplates, darker towards the nucleus (v6
        lumbarised S1: one more, between S1 and S2)."""
        p, fr = self.p, self.fr
        for i in range(len(LEVELS) - 1):
            extra = 0.0
            if p["fracture"] and LEVELS[i + 1] == p["fracture_level"]:
                extra = p["fracture_collapse"] * fr["h"][i + 1]
            self._disc(vol, level_frame(fr, i), level_frame(fr, i + 1), extra)
        if p.get("lumbar_vertebrae", 5) == 6:
            self._disc(vol, level_frame(fr, len(LEVELS) - 1), fr["sacral"][0], 0.0)

    def _disc(self, vol, upper: Dict, lower: Dict, extra: float):
        """One disc between the frames ``upper`` and ``lower`` (:func:`~bmd_d2.phantoms.anatomy.level_frame`), the
        lower endplate ``extra`` mm down (a compressed body)."""
        g, p = self.g, self.p
        c0, R0, h0, d0, w0 = (upper[k] for k in ("center", "R", "h", "d", "w"))
        c1, R1, h1, d1, w1 = (lower[k] for k in ("center", "R", "h", "d", "w"))
        ud = R0[:, 2] + R1[:, 2]
        ud /= np.linalg.norm(ud)
        Rd = R1.copy()
        Rd[:, 2] = ud
        Rd[:, 1] = np.cross(ud, Rd[:, 0])
        Rd[:, 1] /= np.linalg.norm(Rd[:, 1])
        Rd[:, 0] = np.cross(Rd[:, 1], ud)
        top = c0 - R0[:, 2] * h0 / 2
        bot = c1 + R1[:, 2] * (h1 / 2 - extra)
        cd = 0.5 * (top + bot)
        hd = float(np.dot(top - bot, ud)) + 3.0
        a = 0.5 * min(w0, w1) + 1.0
        b = 0.5 * min(d0, d1) + 1.0
        sl = g.box(cd, Rd, [-a, -b, -hd / 2], [a, b, hd / 2])
        if sl is None:
            return
        u, v, w = g.local(sl, cd, Rd)
        dxy = superellipse_d(u, v, a, b, 2.4, notch=0.12)
        f = ramp(dxy, 0.5 * (g.width(Rd[:, 0]) + g.width(Rd[:, 1]))) * ramp(np.abs(w) - hd / 2, g.width(ud))
        nucleus = np.clip(1.0 + dxy / (0.45 * min(a, b)), 0.0, 1.0)
        paint(vol, sl, f, p["disc_hu"] + 25.0 - 40.0 * nucleus)
        self._grow(sl)

    def _canal(self, vol):
        """Spinal canal (a continuous tube of CSF) with its epidural fat rim."""
        g, p, fr = self.g, self.p, self.fr
        n = len(LEVELS)
        for i in range(n):
            c, R, h, d = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i]
            span = h / 2 + (fr["disc"][min(i, n - 2)] if i < n - 1 else 4.0) / 2 + 3.0
            cc = c + R[:, 1] * (d / 2 + 9.0 * p["size"])
            ac, bc = 11.0 * p["size"] * (1 + 0.04 * i), 8.5 * p["size"]
            sl = g.box(cc, R, [-ac - 3, -bc - 3, -span], [ac + 3, bc + 3, span])
            if sl is None:
                continue
            u, v, w = g.local(sl, cc, R)
            dxy = superellipse_d(u, v, ac, bc, 2.2)
            wz = ramp(np.abs(w) - span + 2.0, 3.0)
            paint(vol, sl, ramp(dxy, g.width(R[:, 0])) * wz, p["fat_hu"] + 20.0)
            paint(vol, sl, ramp(dxy + 2.0, g.width(R[:, 0])) * wz, p["csf_hu"])

    def _sacrum(self, vol):
        """Sacral continuation bodies below S1 (unlabelled)."""
        g, p = self.g, self.p
        for s in self.fr["sacral"]:
            half = [s["w"] / 2, s["d"] / 2, s["h"] / 2]
            sl = g.box(s["center"], s["R"], [-x for x in half], half)
            if sl is None:
                continue
            fb, fc, _, _ = body_fracs(g, sl, s["center"], s["R"], s["h"], s["d"], s["w"], p["cortex_mm"])
            dens = 1.1 * p["bmd_mg_cm3"] + 10.0 * texture(self.rng, fb.shape, g)
            paint(vol, sl, fb - fc, self.calib(p["cortex_density"]))
            paint(vol, sl, fc, self.calib(dens, "marrow"))
            self._grow(sl)

    def _level_bmd(self, i, name):
        """(BMD mg/cm³, fractured, collapse mm) of level ``i``: a fractured body is compacted, hence denser."""
        p = self.p
        bmd = level_bmd(p, i)
        fractured = bool(p["fracture"] and name == p["fracture_level"])
        if fractured:
            bmd *= 1.05 + 0.15 * p["fracture_collapse"] / 0.45
        bmd = float(np.clip(bmd, 20.0, 300.0))
        collapse = p["fracture_collapse"] * self.fr["h"][i] if fractured else 0.0
        return bmd, fractured, collapse

    def _core_density(self, fb, uvw, i, bmd):
        """Trabecular density of level ``i`` over its box: texture, basivertebral vein and sclerotic islands."""
        p, rng, fr = self.p, self.rng, self.fr
        u, v, ww = uvw
        h, d, w = fr["h"][i], fr["d"][i], fr["w"][i]
        tau = p["texture_rel"] + 0.12 * (1.0 - bmd / 250.0)
        if "texture_seed" in p:  # v7: the patient's bone, fixed in the vertebra's frame (a re-scan re-images it)
            rng = np.random.default_rng([p["texture_seed"], i])
            tex = local_texture(rng, uvw, (w / 2 + 1.0, d / 2 + 1.0, h / 2 + 1.0))
        else:
            tex = texture(rng, fb.shape, self.g)
        dens = bmd * (1.0 + tau * tex)
        vein = np.exp(-((u / 4.0) ** 2 + ((v - 0.3 * d) / 5.0) ** 2 + (ww / 3.0) ** 2))
        dens *= 1.0 - 0.45 * vein
        # sclerotic islands: the heavy bright tail of real trabecular HU (the core mean is restored by the caller)
        for _ in range(int(rng.poisson(p.get("islands_per_level", 0.0)))):
            cu, cv, cw = rng.uniform(-0.35, 0.35, 3) * np.array([w, d, h])
            rad, amp = rng.uniform(1.0, 2.5), rng.uniform(150.0, 400.0)
            dens += np.float32(amp) * np.exp(-((u - cu) ** 2 + (v - cv) ** 2 + (ww - cw) ** 2) / (2 * rad * rad))
        return dens

    def _body(self, vol, labels, cores, i, name, z_lo, z_hi):
        """Vertebral body of level ``i`` with its textured trabecular core; labelled when half of it is in view."""
        g, p, fr = self.g, self.p, self.fr
        c, R, h, d, w = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i], fr["w"][i]
        bmd, fractured, collapse = self._level_bmd(i, name)
        lo, hi = [-w / 2 - 1, -d / 2 - 1, -h / 2 - 1], [w / 2 + 1, d / 2 + 1, h / 2 + 1]
        corners = np.array([[a, b, cz] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for cz in (lo[2], hi[2])])
        zc = (c + corners @ R.T)[:, 2]
        in_view = float(np.clip((min(zc.max(), z_hi) - max(zc.min(), z_lo)) / (zc.max() - zc.min()), 0.0, 1.0))
        sl = g.box(c, R, lo, hi)
        self.level_info[name] = dict(bmd=bmd, fractured=fractured, in_view=in_view, center=c.tolist(),
                                     height_mm=float(h), depth_mm=float(d), width_mm=float(w))
        if sl is None:
            return
        fb, fc, fe, uvw = body_fracs(g, sl, c, R, h, d, w, p["cortex_mm"] + 0.2 * (i == 7), collapse,
                                     endplate=p.get("endplate_mm"))
        dens = self._core_density(fb, uvw, i, bmd)
        core_m = fc >= 0.99
        if self.metal_segments:
            near = np.zeros(fc.shape, bool)
            for (pa, pb, r, _) in self.metal_segments:
                near |= g.capsule_d(sl, pa, pb, r) < 2.0
            core_m &= ~near
        if core_m.any():
            dens += np.float32(bmd - dens[core_m].mean(dtype=np.float64))
        paint(vol, sl, fb - fc, self.calib(p["cortex_density"]))
        if p.get("endplate_density_factor", 1.0) != 1.0:  # subchondral plates: thicker but less dense than cortex
            paint(vol, sl, fe, self.calib(p["endplate_density_factor"] * p["cortex_density"]))
        paint(vol, sl, fc, self.calib(dens, "trabecular", i))
        lv = LEVEL_TO_LABEL[name]
        if in_view >= 0.5:
            labels[sl][fb >= 0.5] = lv
            cores[sl][core_m] = lv
        self.level_boxes[name] = sl
        self._grow(sl)

    def _metal(self, vol):
        """Pedicle screws and rods, painted last (over everything)."""
        g = self.g
        for (pa, pb, r, hu) in self.metal_segments:
            sl = g.box_points(np.array([pa, pb]), r + 2.0)
            if sl is None:
                continue
            d = g.capsule_d(sl, pa, pb, r)
            paint(vol, sl, ramp(d, g.width(np.ones(3) / math.sqrt(3))), hu)
            self._grow(sl)

    def _posterior(self, vol, i):
        """Pedicles, laminae, spinous and transverse processes, facets of level ``i`` (ellipsoids, local frame)."""
        g, p, fr = self.g, self.p, self.fr
        c, R, h, d = fr["center"][i], fr["R"][i], fr["h"][i], fr["d"][i]
        s = p["size"]
        ac = 11.0 * s * (1 + 0.04 * i)
        yc = d / 2 + 9.0 * s  # canal centre (posterior of body centre)
        hu = self.calib(1.3 * level_bmd(p, i) + 150.0, "trabecular", i)
        name = LEVELS[i]
        v6 = p.get("pelvis") == "sacroiliac"
        sacral_s1 = name == "S1" and p.get("lumbar_vertebrae", 5) != 6  # a lumbarised S1 has lumbar processes
        tp_len = _TP_LENGTH[name] if (sacral_s1 or name != "S1") else _TP_LENGTH["L5"]
        tp_thick = 9.0 if sacral_s1 else 5.0
        parts = [((side * (ac + 2.5), d / 2 + 4.0, 0.12 * h), (4.0 * s, 7.0, 0.3 * h)) for side in (1, -1)]  # pedicles
        parts += [((side * (0.55 * ac), yc + 9.0, -0.05 * h), (0.6 * ac + 3, 3.5, 0.38 * h)) for side in (1, -1)]
        parts.append(((0.0, yc + 9.0 + 16.0 * s, -0.2 * h), (3.5, 17.0 * s, 0.33 * h)))  # spinous process
        parts += [((side * (ac + 3.0 + tp_len), d / 2 + 8.0, 0.1 * h), (tp_len, tp_thick, tp_thick))
                  for side in (1, -1)]  # transverse processes
        parts += [((side * (ac + 4.0), yc + 3.0, zf * h), (5.0, 6.0, 6.0)) for zf in (0.45, -0.45) for side in (1, -1)]
        if name == "S1" and not v6:  # sacral alae (v6: the lateral masses of :meth:`_pelvis`)
            parts += [((side * (d * 0.9), d * 0.15, 0.0), (d * 0.55, 0.5 * d, 0.45 * h)) for side in (-1, 1)]
        width = (g.width(R[:, 0]) + g.width(R[:, 1]) + g.width(R[:, 2])) / 3
        shell = p.get("posterior_cortex_mm")
        # v1-v3: solid bone; v4: a cortical shell first, then the cancellous core painted over every shell (no inner
        # walls where parts overlap) -- real laminae and spinous processes are rings like small bodies
        outer = hu if shell is None else self.calib(p["cortex_density"])
        boxes = []
        for (off, ax) in parts:
            pc = c + R @ np.asarray(off)
            sl = g.box(pc, R, [-ax[0], -ax[1], -ax[2]], list(ax))
            if sl is None:
                continue
            u, v, w = g.local(sl, pc, R)
            boxes.append((sl, u, v, w, ax))
            paint(vol, sl, ellipsoid_frac(u, v, w, ax, width), outer)
            self._grow(sl)
        if shell is not None:
            core = self.calib(p["posterior_core_factor"] * level_bmd(p, i) + 30.0, "trabecular", i)
            for sl, u, v, w, ax in boxes:
                inner = [max(a - shell, 0.5) for a in ax]
                paint(vol, sl, ellipsoid_frac(u, v, w, inner, width), core)

    def _ribs(self, vol):
        """The last ribs (11th/12th; v6: the 11th alone, or a short 13th on L1): short curved tubes from the transverse
        processes, running lateral, anterior and down."""
        g, p, fr = self.g, self.p, self.fr
        hu_c = self.calib(1.2 * p["bmd_mg_cm3"] + 250.0)
        ribs = {11: ((0, 140.0),), 12: ((0, 140.0), (1, 110.0)), 13: ((0, 140.0), (1, 110.0), (2, 70.0))}
        for i, length in ribs[p.get("rib_pairs", 12)]:
            c, R, d = fr["center"][i], fr["R"][i], fr["d"][i]
            for side in (-1, 1):
                pts = []
                for t in np.linspace(0.0, 1.0, 6):
                    ang = t * length / 95.0  # radians along a ~95 mm radius arc
                    x = side * (25.0 + 95.0 * math.sin(ang) * 0.9)
                    y = d / 2 + 15.0 - 95.0 * (1 - math.cos(ang)) * 0.6
                    z = -t * 0.45 * length
                    pts.append(c + R @ np.array([x, y, z]))
                for pa, pb in zip(pts[:-1], pts[1:]):
                    sl = g.box_points(np.array([pa, pb]), 8.0)
                    if sl is None:
                        continue
                    dd = g.capsule_d(sl, pa, pb, 5.0)
                    paint(vol, sl, ramp(dd, 1.0), hu_c - 120.0)
                    paint(vol, sl, ramp(dd + 1.2, 1.0), self.calib(0.9 * p["bmd_mg_cm3"] + 40.0, "marrow"))
                    self._grow(sl)

    def _pelvis(self, vol):
        """v6: the sacral lateral masses (alae) of the fused segments and the posterior ilia meeting them at the
        sacroiliac joints (a ``si_joint_gap_mm`` cleft), joined to the iliac wings of the background."""
        g, p = self.g, self.p
        segs = fused_segments(p, self.fr)
        cortex = self.calib(p["cortex_density"])
        marrow = self.calib(1.1 * p["bmd_mg_cm3"] + 10.0, "marrow")
        ilium = self.calib(1.1 * p["bmd_mg_cm3"] + 300.0)
        gap = p["si_joint_gap_mm"]
        xo = ilium_x(p, self.fr)  # the posterior ilium's centre, where the background's wings end medially
        joints = []
        for k, s in enumerate(segs[:4]):
            c, R, h, d, w = s["center"], s["R"], s["h"], s["d"], s["w"]
            # lateral end of the mass (local u): the top two segments reach the joint, the lower ones taper
            ua = xo - 6.0 - gap if k < 2 else ala_reach(p, segs, k)
            a, cu = (ua - (w / 2 - 4.0)) / 2, (ua + w / 2 - 4.0) / 2
            b, cv = 0.45 * d * (1.0 - 0.2 * k), 0.1 * d
            hz = h / 2 + 1.5
            for side in (-1, 1):
                lo, hi = [side * cu - a - 1, cv - b - 1, -hz - 1], [side * cu + a + 1, cv + b + 1, hz + 1]
                sl = g.box(c, R, lo, hi)
                if sl is None:
                    continue
                uu, vv, ww = g.local(sl, c, R)
                dxy = superellipse_d(uu - side * cu, vv - cv, a, b, 3.0)
                wid = g.width(R[:, 0])
                body = vol[sl] > -200.0  # inside the patient only (the lower segments sweep towards the back)
                outer = ramp(dxy, wid) * ramp(np.abs(ww) - hz, wid) * body
                inner = ramp(dxy + p["cortex_mm"], wid) * ramp(np.abs(ww) - hz + p["cortex_mm"], wid) * body
                paint(vol, sl, outer, cortex)
                paint(vol, sl, inner, marrow)
                self._grow(sl)
                if k < 2:  # the auricular surface: the mass's lateral end, where the ilium meets it
                    end = np.array([[side * ua, cv + f * b, t * hz] for f in (-1.0, 1.0) for t in (-1.0, 1.0)])
                    joints.append((side, c + end @ R.T))
        if not joints:
            return
        eye = np.eye(3)
        for side, pts in joints:  # posterior ilium: a plate beyond the cleft, from the joint's front to behind it
            x = float(pts[:, 0].mean()) + side * (gap + 6.0)
            # back to the posterior-medial tip of the background's v6 iliac wing (spine y + 10 + 0.61 × its 45 mm arc)
            y0, y1 = float(pts[:, 1].min()) - 4.0, float(pts[:, 1].max()) + 10.0 + 0.61 * 45.0
            z0, z1 = float(pts[:, 2].min()), float(pts[:, 2].max())
            ctr = np.array([x, 0.5 * (y0 + y1), 0.5 * (z0 + z1)])
            half = np.array([6.0, 0.5 * (y1 - y0), 0.5 * (z1 - z0)])
            sl = g.box(ctr, eye, list(-half - 1.0), list(half + 1.0))
            if sl is None:
                continue
            uu, vv, ww = g.local(sl, ctr, eye)
            f = ramp(superellipse_d(uu, vv, half[0], half[1], 4.0), g.width(eye[:, 0])) \
                * ramp(np.abs(ww) - half[2], g.width(eye[:, 2])) * (vol[sl] > -200.0)
            paint(vol, sl, f, ilium)
            self._grow(sl)
        zs = np.concatenate([pts[:, 2] for _, pts in joints])
        top = segs[0]["center"] + segs[0]["R"][:, 2] * segs[0]["h"] / 2  # the fused mass's top endplate centre
        self.si_joints = dict(z_mm=[float(zs.min()), float(zs.max())], half_width_mm=float(xo - 6.0 - gap),
                              top_point_lps=[float(v) for v in top])

    def _metal_segments(self):
        """Pedicle screws (two per level) and rods as capsules: list of (start, end, radius mm, HU)."""
        p, fr = self.p, self.fr
        segs, heads = [], {-1: [], 1: []}
        for name in p["metal_levels"]:
            i = LEVELS.index(name)
            c, R, d = fr["center"][i], fr["R"][i], fr["d"][i]
            ac = 11.0 * p["size"] * (1 + 0.04 * i)
            for side in (-1, 1):
                entry = c + R @ np.array([side * (ac + 4.0), d / 2 + 22.0, 0.12 * fr["h"][i]])
                tip = c + R @ np.array([side * (ac - 12.0), -0.25 * d, 0.12 * fr["h"][i]])
                segs.append((entry, tip, 3.0, p["metal_hu"]))
                head = c + R @ np.array([side * (ac + 6.0), d / 2 + 28.0, 0.12 * fr["h"][i]])
                segs.append((head, head + R[:, 1] * 2.0, 5.5, p["metal_hu"]))
                heads[side].append(head)
        for side in (-1, 1):
            if len(heads[side]) == 2:
                segs.append((heads[side][0], heads[side][1], 2.75, p["metal_hu"]))
        return segs


def apply_psf(vol, p: Dict, g, region) -> None:
    """In-plane Gaussian PSF over the spine ``region`` in place (the background is already band-limited by its
    ramps); nothing when the PSF σ is 0 or nothing was rendered in 3-D."""
    s = p["psf_sigma_mm"]
    if not s or region is None:
        return
    m = int(math.ceil(4 * s / g.sp[0])) + 2
    b = region
    sl = (slice(b[0, 0], b[0, 1]), slice(max(b[1, 0] - m, 0), b[1, 1] + m), slice(max(b[2, 0] - m, 0), b[2, 1] + m))
    sub = vol[sl]
    ndimage.gaussian_filter1d(sub, s / g.sp[0], axis=2, output=sub, truncate=3.0)
    ndimage.gaussian_filter1d(sub, s / g.sp[1], axis=1, output=sub, truncate=3.0)


def add_noise(vol, p: Dict, rng: np.random.Generator) -> None:
    """Add correlated Gaussian noise in place: a bank of filtered noise slices, randomly cropped/flipped per slice."""
    sd = p["noise_sd"]
    if not sd:
        return
    nk, nj, ni = vol.shape
    pad = 32
    nb = min(16, nk)
    bank = rng.standard_normal((nb, nj + pad, ni + pad), dtype=np.float32)
    ndimage.gaussian_filter(bank, (0, p["noise_corr_px"], p["noise_corr_px"]), output=bank)
    bank *= np.float32(sd / bank.std())
    picks = rng.integers(0, nb, nk)
    offs = rng.integers(0, pad + 1, (nk, 2))
    flips = rng.integers(0, 2, (nk, 2)).astype(bool)
    for k in range(nk):
        nz = bank[picks[k], offs[k, 0]:offs[k, 0] + nj, offs[k, 1]:offs[k, 1] + ni]
        if flips[k, 0]:
            nz = nz[::-1]
        if flips[k, 1]:
            nz = nz[:, ::-1]
        vol[k] += nz
