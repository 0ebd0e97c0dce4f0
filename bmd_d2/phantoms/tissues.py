"""Generator v5: the CT number of every tissue of a study from its scanner's spectrum and its patient's composition.

:func:`study_physics` turns the drawn scanner (kVp, anode angle, Al/Cu filtration, calibration error) and patient
(size, marrow fat, fat-infiltrated muscle, hematocrit, liver fat, disc hydration, iodine) into the HU the renderer
paints, with :mod:`.physics`:

* **Beam hardening.** The tube spectrum is hardened by ``water_mm``, the AAPM TG 220 water-equivalent diameter
  ``D_w = 2 sqrt((1 + mean HU / 1000) A / pi)`` of the body cross-section at the centre of L3. It is computed
  *analytically* (:func:`water_equivalent_diameter`) from the drawn body outline and its regions, not measured on
  the rendered slice: the body superellipse (exponent 2.3, posterior half-depth 0.96 of the anterior one), the
  subcutaneous fat ring, the 12 mm abdominal-wall muscle ring, the erector spinae and psoas, the vertebral body, the
  aorta, the kidneys and the visceral cavity (soft organ / fat mixture of the drawn ``visceral_fat`` share; bowel gas,
  under 1 % of the cavity, is ignored), iodine of a contrast phase included. Each region counts with its HU through
  a fixed reference spectrum (120 kVp, 7 mm Al, 250 mm of water), so ``water_mm`` is a property of the patient, not
  of the protocol. On rendered L3 slices it agrees with :func:`measured_water_equivalent_diameter` within a few per
  cent (the table and partial volume are what differs).
* **Tissues** (materials of :data:`~bmd_d2.phantoms.physics.MATERIALS`): air (outside the body and bowel gas); fat
  (ICRP adipose at 0.92 g/cm³ times the patient's biological density factor); muscle (ICRU skeletal muscle mixed by
  volume with that fat: fat infiltration grows with age); blood (ICRU whole-blood composition at
  ``1.025 + 0.075 * hematocrit`` g/cm³: plasma 1.025, red cells 1.10); liver (ICRU 44 with a steatosis fat share);
  kidney (ICRU 44); the soft organs of the visceral cavity (ICRU 44 soft tissue); discs (ICRU 44 cartilage diluted
  with water: the annulus; the nucleus is painted 40 HU darker as in v4); CSF; iodine (mg I/ml added to blood, liver,
  kidney and organs in a contrast phase).
* **Bone** is painted from lines ``HU = a + b * mineral density`` (mg/cm³ K2HPO4-equivalent), exact because every
  mixture here is linear in the mineral's partial density: ``cortical`` (mineral in an ICRU soft-tissue matrix: the
  cortical shell, endplates, iliac wings, rib shells), ``trabecular`` per level (mineral in red/yellow marrow of the
  level's fat fraction, :func:`~bmd_d2.phantoms.physics.trabecular_bone`) and ``marrow`` (the patient's mean fat
  fraction: sacrum, rib cores).
* **Scanner calibration error**: the image is ``hu_gain * HU + hu_offset`` (the renderer applies it to every voxel
  after the PSF); ``tissue_hu`` and the truth hold the imaged values, the ``*_hu`` parameters the physics values
  before it.
* **Phantom QCT** (``qct_calibration``): K2HPO4-in-water rods at :data:`ROD_MG_CM3` through the same spectrum and
  calibration error, fitted by a straight line; ``calib_a`` / ``calib_b`` are its intercept and slope, so a
  ``--calibration`` file made from them behaves like a phantom scanned with the patient (it reads the marrow-fat
  bias of single-energy QCT).

Every material's HU at one spectrum comes from one vectorised :func:`~bmd_d2.phantoms.physics.hu_table` call
(~0.3 ms); the anode spectra are cached per (kVp, anode angle), so a study's physics costs milliseconds after the
first study of each tube setting (~0.4 s).
"""
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import physics as phy

__all__ = ["ROD_MG_CM3", "measured_water_equivalent_diameter", "study_physics", "water_equivalent_diameter"]

#: K2HPO4 densities (mg/cm³) of the phantom QCT rods (0 = a water rod).
ROD_MG_CM3 = (0.0, 50.0, 100.0, 150.0, 200.0)
# The spectrum that weighs the regions of the water-equivalent diameter (a fixed reference: Dw is the patient's).
_REFERENCE_TUBE = dict(kvp=120.0, anode_angle_deg=7.0, al_mm=7.0, cu_mm=0.0, water_mm=250.0)
_WALL_MM = 12.0  # abdominal-wall muscle ring inside the subcutaneous fat (background._trunk)
_BODY_EXPONENT = 2.3
_FIELD_SD = 0.17  # SD of the smoothed visceral field (unit white noise, Gaussian sigma 0.8 x 1 x 1 cells)
_L3 = 4  # index of L3 in LEVELS


def _superellipse_area(a: float, b: float, n: float) -> float:
    return 4.0 * a * b * math.gamma(1.0 + 1.0 / n) ** 2 / math.gamma(1.0 + 2.0 / n)


def _organ_share(visceral_fat: float) -> float:
    """Mean soft-organ share of the visceral soup (``background._trunk``'s clipped ramp over a N(0, 0.17²) field)."""
    x, w = np.polynomial.hermite_e.hermegauss(41)
    organ = np.clip((_FIELD_SD * x - (visceral_fat * 2.0 - 1.0) * 0.5) * 3.0 + 0.5, 0.0, 1.0)
    return float(np.sum(w * organ) / np.sum(w))


def water_equivalent_diameter(p: Dict, frames: Dict, rel_atten: Dict[str, float]) -> float:
    """AAPM TG 220 water-equivalent diameter (mm) of the body cross-section at the centre of L3, analytically.

    Args:
        p: the study's parameters (body half-axes, subcutaneous fat, visceral fat, size).
        frames: :func:`~bmd_d2.phantoms.anatomy.spine_frames` of the study (L3 at the origin).
        rel_atten: ``1 + HU / 1000`` of ``fat``, ``muscle``, ``organ``, ``bone`` (the L3 body), ``blood`` and
            ``kidney`` through the reference spectrum.

    Returns:
        ``2 sqrt(sum_i (1 + HU_i / 1000) A_i / pi)`` over the regions ``i`` of the slice (mm).
    """
    a_body, b_ant = p["body_half_width"], p["body_half_depth"]
    theta = np.linspace(0.0, 2.0 * math.pi, 3600, endpoint=False)
    c, s = np.cos(theta), np.sin(theta)
    b = np.where(s > 0, 0.96 * b_ant, b_ant)  # +y (posterior) half is flatter
    r_edge = 1.0 / (np.abs(c / a_body) ** _BODY_EXPONENT + np.abs(s / b) ** _BODY_EXPONENT) ** (1.0 / _BODY_EXPONENT)

    def inside(depth_mm):  # area inside the contour ``depth_mm`` below the skin, along rays from the centre
        return float(0.5 * np.mean(np.clip(r_edge - depth_mm, 0.0, None) ** 2) * 2.0 * math.pi)

    t_f = p["subcut_fat_mm"]
    area = {"fat": inside(0.0) - inside(t_f), "muscle": inside(t_f) - inside(t_f + _WALL_MM)}
    cavity = inside(t_f + _WALL_MM)
    size = p["size"]
    z = [cc[2] for cc in frames["center"]]
    z_t12, z_l2, z_l3, z_s1 = z[1], z[3], z[_L3], z[7]
    w, d = frames["w"][_L3], frames["d"][_L3]
    rp = 6.0 + 16.0 * float(np.clip((z_t12 - z_l3) / max(z_t12 - z_s1, 1.0), 0.0, 1.0))
    kz = float(np.clip(1.0 - ((z_l3 - 0.5 * (z_t12 + z_l2)) / 55.0) ** 2, 0.0, 1.0))
    inner = {
        "muscle": 2 * _superellipse_area(21.0 * size, 24.0 * size, 2.2) + 2 * math.pi * rp * 0.8 * rp,
        "bone": math.pi * w / 2 * d / 2,
        "blood": math.pi * p["aorta_radius"] ** 2,
        "kidney": 2 * math.pi * 28.0 * 20.0 * kz,
    }
    share = _organ_share(p["visceral_fat"])
    soup = max(cavity - sum(inner.values()), 0.0)
    area["organ"] = soup * share
    area["fat"] += soup * (1.0 - share)
    for k, v in inner.items():
        area[k] = area.get(k, 0.0) + v
    weighted = sum(rel_atten[k] * v for k, v in area.items())
    return 2.0 * math.sqrt(weighted / math.pi)


def measured_water_equivalent_diameter(hu_slice: np.ndarray, pixel_area_mm2: float, threshold_hu: float = -500.0,
                                       table_rows=None) -> float:
    """TG 220 water-equivalent diameter (mm) measured on one axial slice: the largest connected region above
    ``threshold_hu`` (the patient; ``table_rows`` rows, if given, are excluded first).

    Args:
        hu_slice: float ``(J, I)`` HU.
        pixel_area_mm2: area of one pixel.
    """
    from scipy import ndimage

    m = np.asarray(hu_slice) > threshold_hu
    if table_rows is not None:
        m[table_rows] = False
    lab, n = ndimage.label(m)
    if n == 0:
        return 0.0
    sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
    body = lab == 1 + int(np.argmax(sizes))
    return 2.0 * math.sqrt(float(np.sum(1.0 + hu_slice[body] / 1000.0)) * pixel_area_mm2 / math.pi)


def _named(name: str, m: phy.Material) -> phy.Material:
    return phy.Material(name, m.density, m.composition)


def _line(values: Dict[str, float], lo: str, hi: str, span: float) -> Tuple[float, float]:
    """(intercept HU, slope HU per mg/cm³) of a line through materials ``lo`` (0) and ``hi`` (``span`` mg/cm³)."""
    a = values[lo]
    return a, (values[hi] - a) / span


def _patient_materials(p: Dict, iodine: Dict[str, float]) -> Dict[str, phy.Material]:
    """The soft tissues of the patient (physics materials), iodine included."""
    M = phy.MATERIALS
    fat = phy.Material("fat", M["adipose"].density * p["fat_density_factor"], M["adipose"].composition)
    fm = p["muscle_fat_fraction"]
    muscle = phy.mix("muscle_p", ((M["muscle"], (1.0 - fm) * M["muscle"].density), (fat, fm * fat.density)))
    blood = phy.Material("blood_p", 1.025 + 0.075 * p["hematocrit"], M["blood"].composition)
    lf = p["liver_fat_fraction"]
    liver = phy.mix("liver_p", ((M["liver"], (1.0 - lf) * M["liver"].density), (fat, lf * fat.density)))
    wf = p["disc_water_fraction"]
    disc = phy.mix("disc_p", ((M["cartilage"], (1.0 - wf) * M["cartilage"].density), (M["water"], wf)))
    return {
        "fat": fat,
        "muscle": muscle,
        "blood": blood,
        "aorta": _named("aorta", phy.with_iodine(blood, iodine["aorta"])),
        "ivc": _named("ivc", phy.with_iodine(blood, iodine["ivc"])),
        "liver": _named("liver", phy.with_iodine(liver, iodine["liver"])),
        "kidney": _named("kidney", phy.with_iodine(M["kidney"], iodine["kidney"])),
        "organ": _named("organ", phy.with_iodine(M["soft_tissue"], iodine["organ"])),
        "disc": disc,
        "csf": _named("csf_p", M["csf"]),
    }


def _bone_materials(fat_fractions: Sequence[float], marrow_ff: float) -> List[phy.Material]:
    """Two points (0 and 200 / 1000 mg/cm³) of every bone line, uniquely named."""
    mats = [_named("cortical_0", phy.mineral_in("soft_tissue", 0.0)),
            _named("cortical_1000", phy.mineral_in("soft_tissue", 1000.0)),
            _named("marrow_0", phy.trabecular_bone(0.0, marrow_ff)),
            _named("marrow_200", phy.trabecular_bone(200.0, marrow_ff))]
    for i, ff in enumerate(fat_fractions):
        mats += [_named(f"trab{i}_0", phy.trabecular_bone(0.0, ff)),
                 _named(f"trab{i}_200", phy.trabecular_bone(200.0, ff))]
    mats += [_named(f"rod_{m:g}", phy.mineral_in("water", m)) for m in ROD_MG_CM3]
    return mats


def study_physics(p: Dict, frames: Dict) -> Dict:
    """Every physics value of a v5 study from its drawn parameters (deterministic; no random draws).

    Args:
        p: the parameters drawn by :func:`~bmd_d2.phantoms.anatomy.draw_params` (v4 and v5 draws).
        frames: :func:`~bmd_d2.phantoms.anatomy.spine_frames` of ``p``.

    Returns:
        Parameters to merge into ``p`` (JSON-ready): the physics HU the renderer paints (``fat_hu``, ``muscle_hu``,
        ``blood_hu``, ``aorta_hu``, ``ivc_hu``, ``liver_hu``, ``kidney_hu``, ``organ_hu``, ``gas_hu``, ``disc_hu``,
        ``csf_hu``, before the scanner's gain/offset), ``bone_lines`` (``cortical``, ``marrow``: ``[a, b]``;
        ``trabecular``: one ``[a, b]`` per level; HU = a + b · mg/cm³, before gain/offset), ``water_mm``,
        ``effective_energy_kev``, ``hu_per_mg`` (imaged trabecular HU per mg/cm³ K2HPO4 at the patient's marrow),
        ``tissue_hu`` (imaged, noise-free HU of ``air``, ``fat``, ``muscle``, ``blood`` (unenhanced), ``aorta``,
        ``liver``, ``kidney``, ``cortical`` (at ``cortex_density``), ``disc``, ``csf``, ``marrow`` (0 mg/cm³)),
        ``qct_calibration`` (``slope``, ``intercept``, ``rods_mg_cm3``, ``rods_hu``) and ``calib_a`` / ``calib_b``
        (= the rod line's intercept / slope).
    """
    iodine = p["iodine_mg_ml"]
    soft = _patient_materials(p, iodine)
    levels_ff = p["marrow_fat_fraction_levels"]
    ff = p["marrow_fat_fraction"]
    bones = _bone_materials(levels_ff, ff)
    body_bmd = _named("l3_body", phy.trabecular_bone(float(np.clip(p["bmd_mg_cm3"], 0.0, 1000.0)), ff))

    # water-equivalent diameter through the reference spectrum, then the study's own hardened spectrum
    # (the iodine of a contrast phase counts: it hardens the beam too)
    ref = phy.hu_table([soft["fat"], soft["muscle"], soft["organ"], soft["aorta"], soft["kidney"], body_bmd],
                       phy.tube_spectrum(**_REFERENCE_TUBE))
    rel = {k: 1.0 + ref[m.name] / 1000.0 for k, m in (("fat", soft["fat"]), ("muscle", soft["muscle"]),
                                                        ("organ", soft["organ"]), ("blood", soft["aorta"]),
                                                        ("kidney", soft["kidney"]), ("bone", body_bmd))}
    water_mm = water_equivalent_diameter(p, frames, rel)
    spectrum = phy.tube_spectrum(p["kvp"], anode_angle_deg=p["anode_angle_deg"], al_mm=p["al_mm"], cu_mm=p["cu_mm"],
                                 water_mm=round(water_mm, 1))
    hu = phy.hu_table(list(soft.values()) + bones, spectrum, p["detector"])
    unenhanced = phy.hu_table([soft["blood"], _named("organ0", phy.MATERIALS["soft_tissue"])], spectrum,
                              p["detector"])
    gain, offset = p["hu_gain"], p["hu_offset"]

    def imaged(v):
        return gain * v + offset

    cortical = _line(hu, "cortical_0", "cortical_1000", 1000.0)
    marrow = _line(hu, "marrow_0", "marrow_200", 200.0)
    trabecular = [_line(hu, f"trab{i}_0", f"trab{i}_200", 200.0) for i in range(len(levels_ff))]
    rods_hu = [imaged(hu[f"rod_{m:g}"]) for m in ROD_MG_CM3]
    slope, intercept = np.polyfit(np.asarray(ROD_MG_CM3), np.asarray(rods_hu), 1)
    out = {
        "fat_hu": hu["fat"], "muscle_hu": hu["muscle_p"], "blood_hu": unenhanced["blood_p"], "aorta_hu": hu["aorta"],
        "ivc_hu": hu["ivc"], "liver_hu": hu["liver"], "kidney_hu": hu["kidney"], "organ_hu": hu["organ"],
        "gas_hu": -1000.0, "disc_hu": hu["disc_p"] - 25.0, "csf_hu": hu["csf_p"],
        "bone_lines": {"cortical": list(cortical), "marrow": list(marrow), "trabecular": [list(t) for t in trabecular]},
        "water_mm": round(water_mm, 1),
        "effective_energy_kev": phy.effective_energy(spectrum, p["detector"]),
        "hu_per_mg": gain * marrow[1],
        "tissue_hu": {
            "air": imaged(-1000.0), "fat": imaged(hu["fat"]), "muscle": imaged(hu["muscle_p"]),
            "blood": imaged(unenhanced["blood_p"]), "aorta": imaged(hu["aorta"]), "liver": imaged(hu["liver"]),
            "kidney": imaged(hu["kidney"]), "cortical": imaged(cortical[0] + cortical[1] * p["cortex_density"]),
            "disc": imaged(hu["disc_p"]), "csf": imaged(hu["csf_p"]), "marrow": imaged(marrow[0]),
        },
        "qct_calibration": {"slope": float(slope), "intercept": float(intercept), "rods_mg_cm3": list(ROD_MG_CM3),
                            "rods_hu": rods_hu},
        "calib_a": float(intercept),
        "calib_b": float(slope),
    }
    return out
