"""The random anatomy, scanner and encoding of a study: every parameter drawn from its seed, and the spine frames.

Ranges (all drawn per study unless fixed in :class:`~bmd_d2.phantoms.options.PhantomOptions`):

* BMD: patient mean drawn across the ACR categories (osteoporosis < 80, osteopenia 80–120, normal > 120 mg/cm³)
  within 30–250 mg/cm³; level-to-level variation ±6 % (1 σ); a fractured vertebra is 5–20 % denser (compaction).
* Calibration ``HU = a + b * density`` (v4): ``a`` ∈ [-10, 30] HU, ``b`` ∈ [0.8, 1.25] HU per mg/cm³ (higher at
  low kVp), one line for every bone.
* Cortical shell 0.5–1.5 mm of 600–1000 mg/cm³, superior/inferior endplates 1–2 mm at 0.4–0.8 × that density;
  posterior elements: a cortical shell of 0.8–1.6 mm around a cancellous core of 0.9–1.4 × BMD + 30 mg/cm³.
  Trabecular core: anisotropic filtered-noise texture (relative SD grows as BMD falls), a basivertebral vein, and
  0–4 sclerotic islands per level on average (Ø 2–5 mm, +150–400 mg/cm³: the heavy bright tail of real trabecular
  HU); the core mean is then set to the level's BMD exactly.
* Soft tissue (v4, HU, before noise): fat −110…−85, muscle 10–60 (low end: fat-infiltrated), disc 55–100, CSF 5–15,
  aorta 35–50 or 150–350 with contrast, liver 50–65 (90–130), kidney 25–35 (140–200), metal 3000–6000 (clipped by
  12-bit storage to 3071).
* PSF: in-plane Gaussian σ 0.35–0.8 mm. Noise: correlated Gaussian (filtered white noise), σ 8–30 HU at 2.5 mm
  scaled by sqrt(2.5 / thickness).
* Geometry: slice thickness 0.625–3 mm (spacing = thickness, or overlapping), pixel spacing 0.5–0.98 mm, matrix 512;
  15 % of studies are coarse in-plane reconstructions (1.5–3 mm pixels, matrix reduced to keep the field of view);
  vertebral-body size ×0.88–1.25 of a base L3 of 46 mm (lateral) × 35.5 mm (AP); patient / table /
  reconstruction-centre offsets, lordosis scaled 0.4–1.3, scoliosis ≤ 8°, axial rotation, 8 % compression
  fractures, 6 % pedicle screws with rods.

Generator v5 (drawn after every draw above, so a v5 study has the v4 study's anatomy, geometry and events):

* Tube: kVp 80 / 100 / 110 / 120 / 130 / 140 (10 / 20 / 8 / 45 / 7 / 10 %), anode angle 7–12° (whole degrees),
  Al 5–9 mm (0.5 mm steps), + Cu 0.1–0.4 mm on 30 % of scanners, energy-integrating detector; the spectrum hardened
  by the patient's water-equivalent diameter at L3 (:mod:`bmd_d2.phantoms.tissues`). DICOM KVP written on 90 %.
* Calibration error of the scanner: every voxel ``gain * HU + offset``, offset −4…4 HU, gain 1 ± 0.01.
* Patient: age 20–90 (PatientAge), sex M/F (PatientSex); marrow fat fraction
  ``clip(0.30 + 0.005 (age − 40) + N(0, 0.06), 0.10, 0.80)``, per level + N(0, 0.02); fat density × (1 ± 0.6 %);
  muscle fat infiltration ``clip(0.02 + 0.002 (age − 20) + N(0, 0.03), 0, 0.3)``; hematocrit N(0.42, 0.04) within
  0.30–0.52; liver fat N(0.03, 0.04) within 0–0.25; disc water share 0–0.35.
* Contrast (the v4 draw, 40 %): arterial or portal-venous (half each); iodine mg I/ml arterial: aorta 10–20,
  liver 0.3–0.8, kidney 3–6; portal-venous: aorta 4–8, liver 1.5–2.5, kidney 4–7; IVC 0.2 (arterial) or 0.9
  (portal-venous) of the aorta, visceral organs half the liver. ContrastBolusAgent written on 70 % of them.
* Every tissue's HU then follows from the spectrum (``tissues.study_physics``); v4's free draws of the soft-tissue
  HU and of ``calib_a`` / ``calib_b`` are replaced by the physics values (``calib_a`` / ``calib_b``: the phantom
  QCT rod line). The BMD draws are unchanged: the mineral density, K2HPO4-equivalent mg/cm³.

Generator v6 (drawn after every v5 draw: a v6 study is its v5 twin plus the pelvis and the variants):

* Pelvis: the fused sacral mass (S1, S2, S3, …) gets lateral masses (alae: a cortical shell round marrow; the top
  two reach the sacroiliac joint, 24–30 mm × size (×0.85 for the second) beyond the body's side, whichever is less;
  the lower ones taper ×0.55, 0.4); the posterior ilium, a
  12 mm plate beyond a 1.5–3 mm sacroiliac cleft over the top two segments, joins them to the iliac wings (arcs that
  open wider than v5's and meet it): in those slices one piece of bone runs from the sacral body to both ilia.
* Transitional anatomy: rib pairs 11 (no T12 rib; 6 %), 12, 13 (a 70 mm rib on L1; 6 %); lumbar vertebrae 4
  (sacralised L5: L5 in the fused mass, its disc ×0.35; 5 %), 5, 6 (lumbarised S1: lumbar processes, no lateral
  mass, an 8 mm × size S1/S2 disc; 5 %). Labels stay anatomical (a lumbarised S1 is labelled S1).
* Field of view: 8 % of v6 scans end inside L4 or L5 (``scan_ends_in``), above the sacroiliac joints: only the rib
  anchor is in view.
* Truth: ``params["level_anchors"]``: ``pelvis_in_view``, ``rib_pairs``, ``lumbar_vertebrae``, ``transitional``,
  ``last_rib_level``, ``sacrum_top_level`` (the level a count from the sacrum calls S1), ``sacrum_top_lps`` (its superior-endplate
  centre) and ``si_joint_z_mm``.

Draws are made in a fixed order whatever the options (options override values after drawing), so fixing one option
never changes the others; the DICOM encoding has its own random stream.
"""
import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from bmd_d2.levels import LEVELS

from . import tissues
from .geometry import Grid, rotation
from .options import TRANSFER_SYNTAXES, DicomStyle, PhantomOptions

# Per-level base anatomy (adult, mm): body height, AP depth, lateral width; disc height below the level.
_BASE_HEIGHT = np.array([23.0, 24.0, 25.5, 26.5, 27.5, 27.5, 27.0, 28.0])
_BASE_DEPTH = np.array([29.0, 31.0, 33.0, 34.0, 35.5, 36.0, 35.0, 34.0])
_BASE_WIDTH = np.array([37.0, 40.0, 42.0, 44.0, 46.0, 48.0, 50.0, 48.0])
_BASE_DISC = np.array([6.0, 7.0, 8.5, 9.5, 10.0, 10.5, 9.0])  # T11/T12 … L5/S1
# Sagittal tilt of each level's superior axis (deg, + = towards anterior): lumbar lordosis, sacral slope at S1.
_BASE_TILT = np.array([-10.0, -8.0, -6.0, -2.0, 2.0, 8.0, 16.0, 32.0])
_THICKNESSES = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
_THICKNESS_P = (0.1, 0.25, 0.15, 0.1, 0.15, 0.1, 0.15)
_KVPS = (80.0, 100.0, 120.0, 140.0)
_KVP_P = (0.1, 0.25, 0.5, 0.15)
_V5_KVPS = (80.0, 100.0, 110.0, 120.0, 130.0, 140.0)
_V5_KVP_P = (0.1, 0.2, 0.08, 0.45, 0.07, 0.1)


def draw_params(rng: np.random.Generator, opts: PhantomOptions) -> Dict:
    """Draw every random parameter of a study, in a fixed order; options override values after drawing."""
    p: Dict = {}

    def pick(name, drawn, override):
        p[name] = drawn if override is None else override
        return p[name]

    # scanner
    th = float(rng.choice(_THICKNESSES, p=_THICKNESS_P))
    th = pick("slice_thickness", th, opts.slice_thickness)
    overlap = rng.random() < 0.3
    sp_frac = float(rng.uniform(0.5, 1.0))
    pick("slice_spacing", round(th * sp_frac, 3) if overlap else th, opts.slice_spacing)
    pick("pixel_spacing", round(float(rng.uniform(0.5, 0.98)), 4), opts.pixel_spacing)
    kvp = pick("kvp", float(rng.choice(_KVPS, p=_KVP_P)), None)
    b_base = {80.0: 1.15, 100.0: 1.05, 120.0: 0.95, 140.0: 0.88}[kvp]
    p["calib_b"] = float(np.clip(b_base * rng.uniform(0.92, 1.08), 0.8, 1.25))
    p["calib_a"] = float(rng.uniform(-10.0, 30.0))
    noise = float(rng.uniform(8.0, 30.0))
    p["noise_sd"] = noise * math.sqrt(2.5 / p["slice_thickness"]) if opts.noise_sd is None else float(opts.noise_sd)
    pick("noise_corr_px", float(rng.uniform(0.5, 1.1)), None)
    pick("psf_sigma_mm", float(rng.uniform(0.35, 0.8)), opts.psf_sigma_mm)
    pick("kernel", str(rng.choice(["B30f", "B45f", "STANDARD", "BONE", "FC18"])), None)
    # patient
    cat = int(rng.integers(0, 3))  # ACR: osteoporosis / osteopenia / normal
    lo, hi = [(30.0, 80.0), (80.0, 120.0), (120.0, 250.0)][cat]
    pick("bmd_mg_cm3", float(rng.uniform(lo, hi)), opts.bmd_mg_cm3)
    p["bmd_level_factor"] = (1.0 + 0.06 * rng.standard_normal(len(LEVELS))).clip(0.8, 1.2).tolist()
    p["size"] = float(rng.uniform(0.88, 1.25))  # base L3 46 x 35.5 mm: small to large adults
    p["height_factor"] = float(rng.uniform(0.92, 1.08))
    p["level_jitter"] = (1.0 + 0.03 * rng.standard_normal((3, len(LEVELS)))).tolist()
    p["disc_factor"] = rng.uniform(0.7, 1.15, len(LEVELS) - 1).tolist()
    p["lordosis"] = float(rng.uniform(0.4, 1.3))
    p["tilt_jitter"] = (2.0 * rng.standard_normal(len(LEVELS))).tolist()
    scol = float(rng.uniform(2.0, 8.0)) if rng.random() < 0.35 else float(rng.uniform(0.0, 2.0))
    p["scoliosis_deg"] = scol if opts.scoliosis else 0.0
    p["scoliosis_period"] = float(rng.uniform(7.0, 12.0))
    p["scoliosis_phase"] = float(rng.uniform(0, 2 * math.pi))
    rot_j = (1.5 * rng.standard_normal(len(LEVELS))).tolist()
    p["rotation_jitter"] = rot_j if opts.scoliosis else [0.0] * len(LEVELS)
    p["cortex_mm"] = float(rng.uniform(0.5, 1.5))
    p["cortex_density"] = float(rng.uniform(600.0, 1000.0))
    p["texture_rel"] = float(rng.uniform(0.12, 0.22))
    p["body_half_width"] = float(rng.uniform(135.0, 190.0))
    p["body_half_depth"] = float(rng.uniform(95.0, 140.0))
    p["subcut_fat_mm"] = float(rng.uniform(8.0, 45.0))
    p["visceral_fat"] = float(rng.uniform(0.15, 0.6))
    p["fat_hu"] = float(rng.uniform(-110.0, -85.0))
    p["muscle_hu"] = float(rng.uniform(10.0, 60.0))  # low end: fat-infiltrated muscle of older patients
    p["disc_hu"] = float(rng.uniform(55.0, 100.0))
    p["csf_hu"] = float(rng.uniform(5.0, 15.0))
    contrast = pick("contrast", bool(rng.random() < 0.4), opts.contrast)
    aorta_c = float(rng.uniform(150.0, 350.0))
    p["aorta_hu"] = aorta_c if contrast else float(rng.uniform(35.0, 50.0))
    p["aorta_radius"] = float(rng.uniform(9.0, 13.0))
    p["liver_hu"] = float(rng.uniform(90.0, 130.0)) if contrast else float(rng.uniform(50.0, 65.0))
    p["kidney_hu"] = float(rng.uniform(140.0, 200.0)) if contrast else float(rng.uniform(25.0, 35.0))
    pick("table", bool(rng.random() < 0.8), opts.table)
    # position (LPS mm): body centre offset from the scanner isocentre, table height, scan z
    p["body_offset"] = [float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20))]
    p["recon_offset"] = [float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))]
    p["z_l3"] = float(rng.uniform(-900.0, -300.0))
    p["scan_bottom_margin"] = float(rng.uniform(5.0, 35.0))
    p["scan_top_cut"] = float(rng.uniform(-0.6, 0.05))
    # events
    frac_draw = bool(rng.random() < (0.14 if p["bmd_mg_cm3"] < 80 else 0.04))
    p["fracture"] = frac_draw if opts.fracture is None else bool(opts.fracture)
    p["fracture_level"] = LEVELS[int(rng.integers(0, 6))]  # T11…L4
    p["fracture_collapse"] = float(rng.uniform(0.2, 0.45))
    metal_draw = bool(rng.random() < 0.06)
    p["metal"] = metal_draw if opts.metal is None else bool(opts.metal)
    p["metal_levels"] = [LEVELS[i] for i in (lambda s: (s, s + 1))(int(rng.integers(4, 6)))]  # L3/L4 or L4/L5
    p["metal_hu"] = float(rng.uniform(3000.0, 6000.0))
    # realism (drawn last so that adding them kept every earlier draw): thick sclerotic endplates, sparse bright
    # trabecular islands, and a share of coarse in-plane reconstructions (3 mm-class pixels, smaller matrix, same FOV)
    p["endplate_mm"] = float(rng.uniform(1.0, 2.0))
    p["islands_per_level"] = float(rng.uniform(0.0, 4.0))
    coarse = bool(rng.random() < 0.15)
    coarse_ps = round(float(rng.uniform(1.5, 3.0)), 4)
    p["matrix"] = int(opts.matrix)
    if coarse and opts.pixel_spacing is None:
        p["matrix"] = max(32, int(round(opts.matrix * p["pixel_spacing"] / coarse_ps)))
        p["pixel_spacing"] = coarse_ps
    # generator v3: endplates are drawn less dense than the lateral cortex (v2's 1–2 mm plates at cortical density
    # made the shell read 145–305 HU at 3 mm against 199 HU in the real CT)
    p["endplate_density_factor"] = float(rng.uniform(0.4, 0.8))
    # ... and the AP depth of the bodies varies on its own (depth/width 0.69–0.87; the real CT's bodies are 0.82)
    p["depth_factor"] = float(rng.uniform(0.95, 1.2))
    # generator v4: posterior elements with a cortical shell and a cancellous core (v1-v3: solid), the ring-shaped
    # laminae / spinous processes a model must learn not to take for vertebral bodies
    p["posterior_cortex_mm"] = float(rng.uniform(0.8, 1.6))
    p["posterior_core_factor"] = float(rng.uniform(0.9, 1.4))
    if opts.generator_version >= 5:  # appended to the stream: every draw above is the same in v4 and v5
        _draw_v5(rng, p, opts)
    if opts.generator_version >= 6:  # appended again: a v6 study is its v5 twin plus the pelvis and the variants
        _draw_v6(rng, p, opts)
    if opts.generator_version >= 7:  # the patient's own trabecular texture (kept by a re-scan, like all of p)
        p["texture_seed"] = int(rng.integers(0, 2 ** 63 - 1))
    return p


def _draw_v6(rng: np.random.Generator, p: Dict, opts: PhantomOptions) -> None:
    """Generator v6: transitional anatomy (rib pairs, lumbar vertebrae) and the sacroiliac joints' width."""
    u_rib, u_lumbar = float(rng.random()), float(rng.random())
    ribs = 11 if u_rib < 0.06 else (13 if u_rib < 0.12 else 12)
    lumbar = 4 if u_lumbar < 0.05 else (6 if u_lumbar < 0.10 else 5)
    p["rib_pairs"] = ribs if opts.rib_pairs is None else int(opts.rib_pairs)
    p["lumbar_vertebrae"] = lumbar if opts.lumbar_vertebrae is None else int(opts.lumbar_vertebrae)
    p["si_joint_gap_mm"] = float(rng.uniform(1.5, 3.0))
    p["ala_reach_mm"] = float(rng.uniform(24.0, 30.0))  # lateral mass beyond the body's side (× size)
    p["pelvis"] = "sacroiliac"
    # a thoracolumbar scan that ends in the lumbar spine (8 %): the pelvis out of view, only the rib anchor left
    u_fov, cut = float(rng.random()), float(rng.uniform(-0.3, 0.3))
    p["scan_ends_in"] = None if u_fov >= 0.08 else ("L4" if cut < 0.0 else "L5")
    p["scan_end_fraction"] = cut


def _draw_v5(rng: np.random.Generator, p: Dict, opts: PhantomOptions) -> None:
    """Generator v5: the scanner's tube and calibration error, the patient's age, sex and tissue composition and the
    contrast phase, in a fixed order; then every tissue's HU from them (:func:`~bmd_d2.phantoms.tissues.study_physics`,
    which overwrites v4's free draws of ``fat_hu``, ``muscle_hu``, ``aorta_hu``, ``liver_hu``, ``kidney_hu``,
    ``disc_hu``, ``csf_hu``, ``calib_a``, ``calib_b`` and ``kvp`` with the physics values)."""
    def pick(name, drawn, override):
        p[name] = drawn if override is None else override
        return p[name]

    pick("kvp", float(rng.choice(_V5_KVPS, p=_V5_KVP_P)), None if opts.kvp is None else float(opts.kvp))
    p["anode_angle_deg"] = float(rng.integers(7, 13))  # whole degrees: few anode spectra to cache
    p["al_mm"] = round(2.0 * float(rng.uniform(5.0, 9.0))) / 2.0
    copper = bool(rng.random() < 0.3)
    cu = round(float(rng.uniform(0.1, 0.4)), 2)
    p["cu_mm"] = cu if copper else 0.0
    p["detector"] = "energy_integrating"
    p["hu_offset"] = float(rng.uniform(-4.0, 4.0))  # the scanner's water calibration error (HU)
    p["hu_gain"] = 1.0 + float(rng.uniform(-0.01, 0.01))
    p["kvp_tag_written"] = bool(rng.random() < 0.9)
    age = pick("age", int(rng.integers(20, 91)), opts.age)
    p["patient_sex"] = "F" if rng.random() < 0.5 else "M"
    ff = float(np.clip(0.30 + 0.005 * (age - 40) + 0.06 * rng.standard_normal(), 0.10, 0.80))
    ff = pick("marrow_fat_fraction", ff, opts.marrow_fat_fraction)
    jitter = 0.02 * rng.standard_normal(len(LEVELS))
    p["marrow_fat_fraction_levels"] = np.clip(ff + jitter, 0.0, 0.95).tolist()
    p["fat_density_factor"] = 1.0 + float(np.clip(0.006 * rng.standard_normal(), -0.015, 0.015))
    p["muscle_fat_fraction"] = float(np.clip(0.02 + 0.002 * (age - 20) + 0.03 * rng.standard_normal(), 0.0, 0.3))
    p["hematocrit"] = float(np.clip(0.42 + 0.04 * rng.standard_normal(), 0.30, 0.52))
    p["liver_fat_fraction"] = float(np.clip(0.03 + 0.04 * rng.standard_normal(), 0.0, 0.25))
    p["disc_water_fraction"] = float(rng.uniform(0.0, 0.35))
    arterial = bool(rng.random() < 0.5)
    doses = {"arterial": dict(aorta=rng.uniform(10.0, 20.0), liver=rng.uniform(0.3, 0.8), kidney=rng.uniform(3.0, 6.0),
                              ivc=0.2),
             "portal_venous": dict(aorta=rng.uniform(4.0, 8.0), liver=rng.uniform(1.5, 2.5),
                                   kidney=rng.uniform(4.0, 7.0), ivc=0.9)}
    p["contrast_tag_written"] = bool(rng.random() < 0.7)
    phase = ("arterial" if arterial else "portal_venous") if p["contrast"] else "none"
    phase = pick("contrast_phase", phase, opts.contrast_phase)
    p["contrast"] = phase != "none"
    dose = doses.get(phase)
    aorta = float(dose["aorta"]) if dose else 0.0
    liver = float(dose["liver"]) if dose else 0.0
    p["iodine_mg_ml"] = {"aorta": aorta, "ivc": dose["ivc"] * aorta if dose else 0.0, "liver": liver,
                         "kidney": float(dose["kidney"]) if dose else 0.0, "organ": 0.5 * liver}
    p.update(tissues.study_physics(p, spine_frames(p)))


def draw_style(rng: np.random.Generator, opts: PhantomOptions) -> DicomStyle:
    """Draw the DICOM encoding (own random stream: changing it never changes the image)."""
    storage = "signed" if rng.random() < 0.6 else "unsigned"
    storage = opts.storage or storage
    signed_choices = [(1.0, -1024.0), (1.0, 0.0), (0.5, -1024.0), (2.0, -2048.0)]
    choice = signed_choices[int(rng.choice(4, p=[0.5, 0.3, 0.1, 0.1]))]
    slope, intercept = (choice if storage == "signed" else (1.0, -1024.0))
    if opts.rescale is not None:
        slope, intercept = float(opts.rescale[0]), float(opts.rescale[1])
    bits = 12 if (storage == "unsigned" and rng.random() < 0.5) else 16
    bits = opts.bits_stored or bits
    ts_names = list(TRANSFER_SYNTAXES)
    ts = ts_names[int(rng.choice(len(ts_names), p=[0.35, 0.15, 0.2, 0.15, 0.15]))]
    ts = opts.transfer_syntax or ts
    shuffle = bool(rng.random() < 0.5) if opts.shuffle_names is None else opts.shuffle_names
    reverse = bool(rng.random() < 0.5) if opts.reverse_instances is None else opts.reverse_instances
    pad = bool(rng.random() < 0.3) and storage == "signed"
    pad = pad if opts.fov_padding is None else opts.fov_padding
    tags = bool(rng.random() < 0.8) if opts.optional_tags is None else opts.optional_tags
    return DicomStyle(storage, slope, intercept, bits, ts, shuffle, reverse, pad, tags)


def redraw_position(p: Dict, rng: np.random.Generator) -> None:
    """Re-scan: redraw the patient position and scan start (same ranges as :func:`draw_params`), in place."""
    p["body_offset"] = [float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20))]
    p["recon_offset"] = [float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))]
    p["z_l3"] = float(rng.uniform(-900.0, -300.0))
    p["scan_bottom_margin"] = float(rng.uniform(5.0, 35.0))


def spine_frames(p: Dict) -> Dict:
    """Centres (LPS mm, L3 at the origin) and rotations of T11…S1 plus two sacral segments below S1."""
    n = len(LEVELS)
    jit = np.asarray(p["level_jitter"])
    s = p["size"]
    h = _BASE_HEIGHT * s * p["height_factor"] * jit[0]
    d = _BASE_DEPTH * s * p.get("depth_factor", 1.0) * jit[1]
    wdt = _BASE_WIDTH * s * jit[2]
    disc = _BASE_DISC * s * np.asarray(p["disc_factor"])
    lumbar = p.get("lumbar_vertebrae", 5)
    if lumbar == 4:  # sacralised L5: a rudimentary L5/S1 disc
        disc[-1] *= 0.35
    tilt = _BASE_TILT * p["lordosis"] + np.asarray(p["tilt_jitter"])
    tilt[-1] = _BASE_TILT[-1] * (0.6 + 0.4 * p["lordosis"]) + p["tilt_jitter"][-1]
    idx = np.arange(n)
    lateral = p["scoliosis_deg"] * np.sin(2 * math.pi * idx / p["scoliosis_period"] + p["scoliosis_phase"])
    lateral[-1] *= 0.3
    axial = 0.6 * lateral + np.asarray(p["rotation_jitter"])
    R = [rotation(tilt[i], lateral[i], axial[i]) for i in range(n)]
    up = [r[:, 2] for r in R]
    c = [np.zeros(3) for _ in range(n)]
    for i in range(3, -1, -1):  # L2 → T11, walking up from L3
        ud = up[i] + up[i + 1]
        ud /= np.linalg.norm(ud)
        c[i] = c[i + 1] + up[i + 1] * h[i + 1] / 2 + ud * disc[i] + up[i] * h[i] / 2
    for i in range(5, n):  # L4 → S1
        ud = up[i] + up[i - 1]
        ud /= np.linalg.norm(ud)
        c[i] = c[i - 1] - up[i - 1] * h[i - 1] / 2 - ud * disc[i - 1] - up[i] * h[i] / 2
    # sacral continuation (unlabelled): S2, S3 smaller, tilted further, fused (1.5 mm ossified disc)
    sac = []
    prev_c, prev_R, prev_h = c[-1], R[-1], h[-1]
    for k, (hs, ds, ws, dt) in enumerate([(22.0, 28.0, 40.0, 14.0), (18.0, 22.0, 32.0, 26.0)]):
        Rk = rotation(tilt[-1] + dt, lateral[-1], axial[-1])
        hs, ds, ws = hs * s, ds * s, ws * s
        gap = 8.0 * s if (k == 0 and lumbar == 6) else 1.5  # lumbarised S1: a full S1/S2 disc
        ck = prev_c - prev_R[:, 2] * prev_h / 2 - Rk[:, 2] * (gap + hs / 2)
        sac.append(dict(center=ck, R=Rk, h=hs, d=ds, w=ws))
        prev_c, prev_R, prev_h = ck, Rk, hs
    return dict(center=c, R=R, h=h, d=d, w=wdt, disc=disc, tilt=tilt, lateral=lateral, axial=axial, sacral=sac)


SI_TAPER = (1.0, 0.85, 0.55, 0.4)  # v6: lateral reach of the sacral mass per fused segment, cranial → caudal


def level_frame(fr: Dict, i: int) -> Dict:
    """The frame of level ``i`` of :func:`spine_frames` as the sacral segments carry theirs: ``center``, ``R``, ``h``,
    ``d``, ``w``."""
    return dict(center=fr["center"][i], R=fr["R"][i], h=fr["h"][i], d=fr["d"][i], w=fr["w"][i])


def fused_segments(p: Dict, fr: Dict) -> List[Dict]:
    """v6: frames (:func:`level_frame`) of the fused sacral mass, cranial → caudal: S1, S2, S3; a sacralised L5 joins
    it on top, a lumbarised S1 leaves it (``lumbar_vertebrae`` 4 / 6)."""
    lumbar = p.get("lumbar_vertebrae", 5)
    segs = [level_frame(fr, i) for i in ([6, 7] if lumbar == 4 else [7])]
    segs += [dict(s) for s in fr["sacral"]]
    return segs[1:] if lumbar == 6 else segs


def ala_reach(p: Dict, segs: List[Dict], k: int) -> float:
    """v6: lateral end (mm from the spine's axis) of fused segment ``k``'s lateral mass."""
    return segs[k]["w"] / 2 + p["ala_reach_mm"] * p["size"] * SI_TAPER[k]


def ilium_x(p: Dict, fr: Dict) -> float:
    """v6: lateral offset (mm from the spine's axis) of the posterior ilium's centre, beyond the sacroiliac cleft."""
    segs = fused_segments(p, fr)
    return min(ala_reach(p, segs, k) for k in range(min(2, len(segs)))) + p["si_joint_gap_mm"] + 6.0


def level_bmd(p: Dict, i: int) -> float:
    """Level ``i``'s drawn BMD before fracture compaction (mg/cm³); used for posterior-element density."""
    return p["bmd_mg_cm3"] * p["bmd_level_factor"][i]


def hu_of_density(p: Dict, density):
    """The scanner calibration ``HU = a + b * density`` of the study with parameters ``p`` (scalar or array)."""
    return p["calib_a"] + p["calib_b"] * density


def bone_hu(p: Dict, density, kind: str = "cortical", level: int = 0):
    """HU (before the scanner's gain/offset) of bone of mineral ``density`` (mg/cm³, scalar or array).

    Generator v4 paints every bone with :func:`hu_of_density`; v5 with the physics line of its material:
    ``"cortical"`` (mineral in soft tissue), ``"trabecular"`` (in the marrow of ``level``, an index of ``LEVELS``) or
    ``"marrow"`` (in the patient's mean marrow).
    """
    lines = p.get("bone_lines")
    if lines is None:
        return hu_of_density(p, density)
    a, b = lines["trabecular"][level] if kind == "trabecular" else lines[kind]
    return a + b * density


@dataclass
class Layout:
    """Where the drawn anatomy lies in the scanner: the voxel grid, the spine frames and the body centre.

    Attributes:
        g: the voxel grid of the study.
        fr: :func:`spine_frames` moved into LPS (L3 centre placed in the body), with ``sacral`` segments.
        body_c: float64 ``(2,)`` LPS (x, y) mm of the body centre.
        affine: float64 ``(4, 4)`` voxel ``(i, j, k, 1)`` → LPS mm.
    """

    g: Grid
    fr: Dict
    body_c: np.ndarray
    affine: np.ndarray

    def spine_xy(self, z):
        """Interpolated (x, y) of the vertebral-body axis, AP half-depth and half-width at heights ``z`` (mm)."""
        fr = self.fr
        cz = np.array([c[2] for c in fr["center"]] + [s["center"][2] for s in fr["sacral"]])
        cx = np.array([c[0] for c in fr["center"]] + [s["center"][0] for s in fr["sacral"]])
        cy = np.array([c[1] for c in fr["center"]] + [s["center"][1] for s in fr["sacral"]])
        dd = np.concatenate([fr["d"], [s["d"] for s in fr["sacral"]]]) / 2
        ww = np.concatenate([fr["w"], [s["w"] for s in fr["sacral"]]]) / 2
        o = np.argsort(cz)
        return tuple(np.interp(z, cz[o], arr[o]) for arr in (cx, cy, dd, ww))


def lay_out(p: Dict, opts: PhantomOptions) -> Layout:
    """Place the spine in the body, choose the scan range in z and the reconstruction field of view."""
    fr = spine_frames(p)
    ps, th, dz = p["pixel_spacing"], p["slice_thickness"], p["slice_spacing"]
    n = p.get("matrix", opts.matrix)
    body_c = np.array(p["body_offset"])
    bw, bd = p["body_half_width"], p["body_half_depth"]
    # spine (L3 centre) inside the body: posterior third
    l3 = np.array([body_c[0] + 0.03 * bw, body_c[1] + bd - 72.0 * p["size"], p["z_l3"]])
    fr["center"] = [c + l3 for c in fr["center"]]
    for s in fr["sacral"]:
        s["center"] = s["center"] + l3
    # scan range in z
    lo_pts: List[float] = [fr["sacral"][0]["center"][2] - fr["sacral"][0]["h"] / 2]
    bottom = min(lo_pts[0], fr["center"][-1][2] - fr["h"][-1] / 2) - p["scan_bottom_margin"]
    if p.get("scan_ends_in"):  # v6: the scan stops inside L4 or L5 (above the sacroiliac joints)
        i = LEVELS.index(p["scan_ends_in"])
        bottom = fr["center"][i][2] + p["scan_end_fraction"] * fr["h"][i]
    top_full = fr["center"][0][2] + fr["h"][0] / 2
    top = top_full + p["scan_top_cut"] * fr["h"][0]
    nk = int(math.floor((top - bottom) / dz)) + 1
    nk = max(8, min(nk, opts.max_slices))
    fov = n * ps
    if fov < 330.0:  # targeted reconstruction: centre on the spine
        ctr = l3[:2] + np.array([0.0, -15.0]) + 0.5 * np.array(p["recon_offset"])
    else:
        ctr = np.array(p["recon_offset"])
    origin = np.array([ctr[0] - (n - 1) / 2 * ps, ctr[1] - (n - 1) / 2 * ps, bottom])
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = ps, ps, dz
    aff[:3, 3] = origin
    return Layout(g=Grid((nk, n, n), origin, np.array([ps, ps, dz]), th), fr=fr, body_c=body_c, affine=aff)
