"""X-ray physics of the phantoms: the HU of every material from a tube spectrum and tabulated attenuation.

The model:

* A **tube spectrum** (:class:`Spectrum`, :func:`tube_spectrum`): photon fluence per energy bin of a tungsten anode
  at a tube potential of 80–140 kVp and an anode angle, from spekpy (its default physics model, 0.5 keV bins),
  through a filtration (mm Al, optionally mm Cu) applied as ``exp(-mu(E) * t)`` with the same attenuation tables as
  every material below (Al 2.699, Cu 8.96 g/cm³; within 0.03 keV of spekpy's own filters in mean energy). It is
  **hardened** through a water-equivalent patient thickness (:meth:`Spectrum.hardened`): the fluence is multiplied by
  ``exp(-mu_water(E) * t)``. The anode spectra (the slow part, ~0.4 s each) are cached per (kVp, anode angle), the
  filtered and hardened ones per argument set, so a new filtration or patient costs well under a millisecond.
* A **material** (:class:`Material`): elemental composition by mass fraction and density. Its linear attenuation is
  ``mu(E) = rho * sum_i w_i (mu/rho)_i(E)``, with the elements' total mass attenuation coefficients (coherent and
  incoherent scattering, photo-absorption) from the Elam tables in xraydb.
* The **CT number** (:func:`hu`): the material's attenuation averaged over the hardened spectrum, weighted by the
  detector's response: ``E * fluence(E)`` for an energy-integrating detector (the default, as in clinical CT),
  ``fluence(E)`` for a photon-counting one. Then ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)`` with water and
  air averaged over the same spectrum, so water is 0 HU and air -1000 HU at every spectrum by construction.
* The **effective energy** (:func:`effective_energy`): the monoenergetic energy whose water attenuation equals the
  spectrum's effective water attenuation.

Ignored: scatter, the detector's response beyond the energy weighting (no efficiency or spectral blur), the
reconstruction (kernel, beam-hardening correction, cupping), the bow-tie filter's variation across the field, the
heel effect, and the change of the spectrum along the path through the object itself (each material is averaged over
the one spectrum given, i.e. a thin object at the centre of a patient of the hardening thickness).

Units: energies in keV, densities in g/cm³, mass attenuation in cm²/g, linear attenuation in 1/cm, thicknesses in
mm, mineral densities (BMD) in mg/cm³, iodine in mg I per ml (= mg/cm³).

Reference mineral: BMD is the density of a named reference mineral, **K2HPO4-equivalent mg/cm³ unless said**
(hydroxyapatite, Ca10(PO4)6(OH)2, with ``mineral="HA"``). In a trabecular mixture (:func:`trabecular_bone`) the
mineral occupies its own volume at its solid density (K2HPO4 2.44 g/cm³, HA 3.16 g/cm³) and marrow fills the rest,
so the HU-per-mg slope depends a little on the marrow it displaces. The marrow's fat fraction is the volume share of
yellow marrow in a red/yellow mix; ICRU 44's red marrow already holds about 40 % lipid by mass (yellow about 80 %),
so fat fraction 0 means "all red marrow", not lipid-free marrow. Iodine (:func:`with_iodine`) adds its mass without
displacing the base material (the contrast agent's organic carrier is ignored).

Sources of the tables (:data:`MATERIALS`): skeletal muscle, whole blood, cortical bone, red and yellow marrow,
``adipose_icru44``, liver, kidney, cartilage (the intervertebral discs) and ``soft_tissue`` (ICRU 44 "soft tissue":
bowel wall and mesentery, and the matrix of cortical bone) from ICRU Report 44 (1989), "Tissue Substitutes in
Radiation Dosimetry and Measurement", appendix A, as NIST lists them (NIST Standard Reference Database 126, "X-ray
mass attenuation coefficients", table 2). Cerebrospinal fluid (``csf``, 1.007 g/cm³: H 11.1, O 88.0, Na 0.5,
Cl 0.4 %) from ICRU Report 46 (1992) after H. Q. Woodard and D. R. White, Br. J. Radiol. 59 (1986) 1209–1218 (not
in the NIST table). ``adipose`` (the fat of the phantoms) is NIST's "Adipose Tissue (ICRP)" (ICRP Publication 23,
0.92 g/cm³): it reads the -100 HU of subcutaneous fat in clinical CT, where ICRU 44's 0.95 g/cm³ adipose reads about
-80 HU at 120 kVp. Dry air near sea level from the same NIST table; water H2O at 1.000 g/cm³; K2HPO4 and
hydroxyapatite from their formulas with IUPAC 2013 standard atomic weights, solid densities from the CRC Handbook of
Chemistry and Physics; iodine as the element. Attenuation: W. T. Elam, B. D. Ravel, J. R. Sieber, Radiat. Phys.
Chem. 63 (2002) 121–128, via xraydb. Spectra: G. Poludniowski et al., "SpekPy v2.0", Med. Phys. 48 (2021)
3630–3637. Check against the Catphan 503 sensitometry inserts (PMP, LDPE, polystyrene, acrylic, Teflon): all within
the manual's nominal HU ranges at 120 kVp behind 200 mm of water (``tests/test_phantom_physics.py``).

Figures (120 kVp, 7 mm Al, 200 mm water, energy-integrating): effective energy 71.5 keV; fat -106.5, muscle +43.4,
blood +56.8, cortical bone +1648 HU; 1.23 HU per mg/cm³ K2HPO4 (80 kVp 1.73, 140 kVp 1.10); +10 % yellow marrow
-6.0 HU at 100 mg/cm³; iodine +27.6 HU per mg I/ml.

Neither library downloads anything: spekpy's tables and xraydb's SQLite database ship inside their wheels. Both are
imported on first use, so importing this module is cheap.
"""
import functools
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DETECTORS",
    "MATERIALS",
    "MINERALS",
    "Material",
    "Spectrum",
    "effective_energy",
    "hu",
    "hu_per_fat_fraction",
    "hu_per_mg",
    "hu_table",
    "mineral_in",
    "mix",
    "trabecular_bone",
    "tube_spectrum",
    "with_iodine",
]

DETECTORS = ("energy_integrating", "photon_counting")
_BIN_KEV = 0.5  # spekpy's energy bin width
_KVP_RANGE = (80.0, 140.0)

# Standard atomic weights (IUPAC 2013, conventional values), g/mol: for the mineral formulas below.
_ATOMIC_WEIGHT = {"H": 1.008, "O": 15.999, "P": 30.973762, "K": 39.0983, "Ca": 40.078}


@dataclass(frozen=True)
class Material:
    """A material: elemental composition by mass fraction and density.

    Attributes:
        name: label (used as the key of :func:`hu_table` results).
        density: g/cm³.
        composition: ``((symbol, mass fraction), ...)``, fractions summing to 1 (normalised on construction).
    """

    name: str
    density: float
    composition: Tuple[Tuple[str, float], ...]

    def __post_init__(self):
        if not self.density > 0:
            raise ValueError(f"material {self.name!r}: density must be > 0 g/cm³, got {self.density}")
        comp = tuple((str(el), float(w)) for el, w in self.composition)
        if not comp or any(w < 0 for _, w in comp) or sum(w for _, w in comp) <= 0:
            raise ValueError(f"material {self.name!r}: composition needs non-negative mass fractions, got {comp}")
        total = sum(w for _, w in comp)
        object.__setattr__(self, "composition", tuple((el, w / total) for el, w in comp if w > 0))
        object.__setattr__(self, "density", float(self.density))

    def mass_attenuation(self, energies_kev: np.ndarray) -> np.ndarray:
        """Total mass attenuation coefficient (cm²/g), shape of ``energies_kev`` (1-D, keV)."""
        energies = _energy_grid(energies_kev)
        return np.asarray([w for _, w in self.composition]) @ _element_table(tuple(el for el, _ in self.composition),
                                                                            energies)

    def mu(self, energies_kev: np.ndarray) -> np.ndarray:
        """Linear attenuation coefficient (1/cm), shape of ``energies_kev`` (1-D, keV)."""
        return self.density * self.mass_attenuation(energies_kev)


def _formula(name: str, density: float, atoms: Mapping[str, int]) -> Material:
    """A compound from its formula (atoms per formula unit) and density."""
    return Material(name, density, tuple((el, n * _ATOMIC_WEIGHT[el]) for el, n in atoms.items()))


def _icru(name: str, density: float, **fractions: float) -> Material:
    """A tissue from its mass fractions in % (ICRU Report 44 / NIST tables)."""
    return Material(name, density, tuple((el, pct / 100.0) for el, pct in fractions.items()))


#: Named materials; compositions in % by mass (sources in the module docstring).
MATERIALS: Dict[str, Material] = {
    m.name: m for m in (
        Material("water", 1.0, (("H", 0.111894), ("O", 0.888106))),
        Material("air", 0.00120479, (("C", 0.000124), ("N", 0.755268), ("O", 0.231781), ("Ar", 0.012827))),
        _icru("adipose", 0.92, H=11.9477, C=63.724, N=0.797, O=23.2333, Na=0.05, Mg=0.002, P=0.016, S=0.073,
              Cl=0.119, K=0.032, Ca=0.002, Fe=0.002, Zn=0.002),
        _icru("adipose_icru44", 0.95, H=11.4, C=59.8, N=0.7, O=27.8, Na=0.1, S=0.1, Cl=0.1),
        _icru("muscle", 1.05, H=10.2, C=14.3, N=3.4, O=71.0, Na=0.1, P=0.2, S=0.3, Cl=0.1, K=0.4),
        _icru("blood", 1.06, H=10.2, C=11.0, N=3.3, O=74.5, Na=0.1, P=0.1, S=0.2, Cl=0.3, K=0.2, Fe=0.1),
        _icru("cortical_bone", 1.92, H=3.4, C=15.5, N=4.2, O=43.5, Na=0.1, Mg=0.2, P=10.3, S=0.3, Ca=22.5),
        _icru("red_marrow", 1.03, H=10.5, C=41.4, N=3.4, O=43.9, P=0.1, S=0.2, Cl=0.2, K=0.2, Fe=0.1),
        _icru("yellow_marrow", 0.98, H=11.5, C=64.4, N=0.7, O=23.1, Na=0.1, S=0.1, Cl=0.1),
        _icru("liver", 1.06, H=10.2, C=13.9, N=3.0, O=71.6, Na=0.2, P=0.3, S=0.3, Cl=0.2, K=0.3),
        _icru("kidney", 1.05, H=10.3, C=13.2, N=3.0, O=72.4, Na=0.2, P=0.2, S=0.2, Cl=0.2, K=0.2, Ca=0.1),
        _icru("cartilage", 1.10, H=9.6, C=9.9, N=2.2, O=74.4, Na=0.5, P=2.2, S=0.9, Cl=0.3),
        _icru("soft_tissue", 1.06, H=10.2, C=14.3, N=3.4, O=70.8, Na=0.2, P=0.3, S=0.3, Cl=0.2, K=0.3),
        _icru("csf", 1.007, H=11.1, O=88.0, Na=0.5, Cl=0.4),
        _formula("K2HPO4", 2.44, {"K": 2, "H": 1, "P": 1, "O": 4}),
        _formula("HA", 3.16, {"Ca": 10, "P": 6, "O": 26, "H": 2}),
        Material("iodine", 4.93, (("I", 1.0),)),
    )
}

#: Reference bone minerals accepted by :func:`trabecular_bone` (name -> material at its solid density).
MINERALS = {"K2HPO4": MATERIALS["K2HPO4"], "HA": MATERIALS["HA"]}

MaterialLike = Union[str, Material]


def _material(m: MaterialLike) -> Material:
    if isinstance(m, Material):
        return m
    if m not in MATERIALS:
        raise ValueError(f"unknown material {m!r}; named materials: {sorted(MATERIALS)}")
    return MATERIALS[m]


# The tube's filters (elements at their CRC Handbook densities), applied with the same Elam tables as every tissue.
_FILTERS = {"Al": Material("Al", 2.699, (("Al", 1.0),)), "Cu": Material("Cu", 8.96, (("Cu", 1.0),))}


def mix(name: str, parts: Iterable[Tuple[Material, float]]) -> Material:
    """A mixture from its components' partial densities.

    Args:
        name: label of the mixture.
        parts: ``(material, partial density in g/cm³)`` pairs: the mass of each component per cm³ of mixture.

    Returns:
        The mixture, of density the sum of the partial densities.
    """
    fractions: Dict[str, float] = {}
    total = 0.0
    for material, partial in parts:
        if partial < 0:
            raise ValueError(f"mixture {name!r}: partial density of {material.name!r} must be >= 0, got {partial}")
        total += partial
        for el, w in material.composition:
            fractions[el] = fractions.get(el, 0.0) + partial * w
    if total <= 0:
        raise ValueError(f"mixture {name!r}: no mass (every partial density is 0)")
    return Material(name, total, tuple(fractions.items()))


def trabecular_bone(bmd_mg_cm3: float, fat_fraction: float = 0.0, mineral: str = "K2HPO4") -> Material:
    """Trabecular bone: reference mineral at ``bmd_mg_cm3`` plus marrow filling the rest of the volume.

    Args:
        bmd_mg_cm3: mineral density (mg/cm³ of ``mineral``), 0 up to the mineral's solid density.
        fat_fraction: volume share of yellow marrow in the marrow (0 = red marrow, 1 = yellow marrow).
        mineral: ``"K2HPO4"`` or ``"HA"`` (:data:`MINERALS`).

    Returns:
        The mixture (density in g/cm³).
    """
    if mineral not in MINERALS:
        raise ValueError(f"mineral must be one of {sorted(MINERALS)}, got {mineral!r}")
    if not 0.0 <= fat_fraction <= 1.0:
        raise ValueError(f"fat_fraction must be within 0–1, got {fat_fraction}")
    solid = MINERALS[mineral]
    mineral_g = float(bmd_mg_cm3) / 1000.0
    if not 0.0 <= mineral_g < solid.density:
        raise ValueError(f"bmd_mg_cm3 must be within 0–{1000 * solid.density:.0f} for {mineral}, got {bmd_mg_cm3}")
    marrow_volume = 1.0 - mineral_g / solid.density
    red, yellow = MATERIALS["red_marrow"], MATERIALS["yellow_marrow"]
    return mix(f"trabecular_{mineral}_{bmd_mg_cm3:g}_fat{fat_fraction:g}", (
        (solid, mineral_g),
        (red, marrow_volume * (1.0 - fat_fraction) * red.density),
        (yellow, marrow_volume * fat_fraction * yellow.density),
    ))


def mineral_in(base: MaterialLike, mg_cm3: float, mineral: str = "K2HPO4", name: Optional[str] = None) -> Material:
    """Reference mineral at ``mg_cm3`` in a ``base`` matrix that fills the rest of the volume.

    The mineral occupies its own volume at its solid density (as in :func:`trabecular_bone`), so HU is exactly linear
    in ``mg_cm3``. Uses: a QCT calibration rod (K2HPO4 in water) and cortical bone (mineral in a soft-tissue matrix).

    Args:
        base: the matrix (a :class:`Material` or the name of one in :data:`MATERIALS`).
        mg_cm3: mineral density (mg/cm³), 0 up to the mineral's solid density.
        mineral: ``"K2HPO4"`` or ``"HA"`` (:data:`MINERALS`).
        name: label of the mixture (default ``<mineral>_<mg_cm3>_in_<base>``).
    """
    if mineral not in MINERALS:
        raise ValueError(f"mineral must be one of {sorted(MINERALS)}, got {mineral!r}")
    matrix, solid = _material(base), MINERALS[mineral]
    mineral_g = float(mg_cm3) / 1000.0
    if not 0.0 <= mineral_g < solid.density:
        raise ValueError(f"mineral density must be within 0–{1000 * solid.density:.0f} mg/cm³ for {mineral}, "
                         f"got {mg_cm3}")
    return mix(name or f"{mineral}_{mg_cm3:g}_in_{matrix.name}",
               ((solid, mineral_g), (matrix, (1.0 - mineral_g / solid.density) * matrix.density)))


def with_iodine(base: Material, mg_iodine_per_ml: float) -> Material:
    """``base`` (e.g. blood or an organ) with iodinated contrast at ``mg_iodine_per_ml`` mg I/ml added to its mass."""
    if mg_iodine_per_ml < 0:
        raise ValueError(f"iodine concentration must be >= 0 mg/ml, got {mg_iodine_per_ml}")
    return mix(f"{base.name}+I{mg_iodine_per_ml:g}", ((base, base.density),
                                                      (MATERIALS["iodine"], mg_iodine_per_ml / 1000.0)))


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A photon spectrum: fluence per energy bin (read-only arrays).

    Attributes:
        energies_kev: float64 ``(E,)`` bin centres (keV).
        fluence: float64 ``(E,)`` photons per bin (spekpy's photons cm⁻² mAs⁻¹ at 100 cm, times any hardening).
        kvp: tube potential (kV).
        anode_angle_deg: anode angle (degrees).
        al_mm: aluminium filtration (mm).
        cu_mm: copper filtration (mm).
        water_mm: water-equivalent thickness the beam has been hardened through (mm; 0 = the tube's output).
    """

    energies_kev: np.ndarray
    fluence: np.ndarray
    kvp: float
    anode_angle_deg: float
    al_mm: float
    cu_mm: float
    water_mm: float = 0.0

    def hardened(self, water_mm: float) -> "Spectrum":
        """This spectrum after ``water_mm`` more of water (beam hardening by the patient)."""
        if water_mm < 0:
            raise ValueError(f"water thickness must be >= 0 mm, got {water_mm}")
        mu_w = MATERIALS["water"].mu(self.energies_kev)
        fluence = _readonly(self.fluence * np.exp(-mu_w * (water_mm / 10.0)))
        return Spectrum(self.energies_kev, fluence, self.kvp, self.anode_angle_deg, self.al_mm, self.cu_mm,
                        self.water_mm + float(water_mm))

    def weights(self, detector: str = "energy_integrating") -> np.ndarray:
        """float64 ``(E,)`` normalised weights of the bins in the detector signal (sum 1)."""
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
        w = self.fluence * self.energies_kev if detector == "energy_integrating" else self.fluence
        total = w.sum()
        if not total > 0:
            raise ValueError(f"spectrum {self.kvp:g} kVp hardened by {self.water_mm:g} mm water has no photons left")
        return w / total

    def mean_energy(self) -> float:
        """Fluence-weighted mean photon energy (keV)."""
        return float(np.sum(self.energies_kev * self.fluence) / np.sum(self.fluence))


def tube_spectrum(kvp: float, *, anode_angle_deg: float = 7.0, al_mm: float = 7.0, cu_mm: float = 0.0,
                  water_mm: float = 0.0) -> Spectrum:
    """The (cached) spectrum of a CT tube, optionally hardened through ``water_mm`` of water.

    Args:
        kvp: tube potential, 80–140 kV in steps of 0.5 kV (every clinical setting: 80, 90, 100, 120, 135, 140).
        anode_angle_deg: anode angle in degrees (clinical CT tubes: about 7–12).
        al_mm: total aluminium-equivalent filtration in mm (inherent + added + bow-tie centre; clinical CT ~6–9).
        cu_mm: added copper filtration in mm (0 for most protocols).
        water_mm: water-equivalent patient thickness the beam is hardened through (mm).

    Returns:
        The spectrum; the same (identical, read-only) object for the same arguments.
    """
    return _cached_spectrum(float(kvp), float(anode_angle_deg), float(al_mm), float(cu_mm), float(water_mm))


@functools.lru_cache(maxsize=256)
def _cached_spectrum(kvp: float, anode_angle_deg: float, al_mm: float, cu_mm: float, water_mm: float) -> Spectrum:
    tube = _tube(kvp, anode_angle_deg, al_mm, cu_mm)
    return tube.hardened(water_mm) if water_mm else tube


@functools.lru_cache(maxsize=64)
def _tube(kvp: float, anode_angle_deg: float, al_mm: float, cu_mm: float) -> Spectrum:
    """The tube's filtered output: the anode's spectrum (spekpy, cached) through the Al and Cu filters."""
    if al_mm < 0 or cu_mm < 0:
        raise ValueError(f"filtration must be >= 0 mm, got {al_mm:g} mm Al, {cu_mm:g} mm Cu")
    anode = _anode(kvp, anode_angle_deg)
    mu = (al_mm / 10.0) * _FILTERS["Al"].mu(_GRID) + (cu_mm / 10.0) * _FILTERS["Cu"].mu(_GRID)
    return Spectrum(_GRID, _readonly(anode * np.exp(-mu)), kvp, anode_angle_deg, al_mm, cu_mm, 0.0)


@functools.lru_cache(maxsize=128)
def _anode(kvp: float, anode_angle_deg: float) -> np.ndarray:
    """Unfiltered spekpy fluence on :data:`_GRID` (zeros above the kVp): the slow part, ~0.4 s per call."""
    if not _KVP_RANGE[0] <= kvp <= _KVP_RANGE[1] or (2.0 * kvp) % 1.0:
        raise ValueError(f"kvp must be within {_KVP_RANGE[0]:g}–{_KVP_RANGE[1]:g} kV in steps of 0.5 kV "
                         f"(spekpy's bins), got {kvp:g}")
    if not 0.0 < anode_angle_deg < 90.0:
        raise ValueError(f"anode angle must be within 0–90 degrees, got {anode_angle_deg:g}")
    import spekpy  # imported on first use: ~0.7 s

    spek = spekpy.Spek(kvp=kvp, th=anode_angle_deg, dk=_BIN_KEV)
    energies, fluence = spek.get_spectrum(flu=True, diff=False)
    # every spectrum goes on one grid (zeros above its kVp), so the attenuation tables are computed once per process
    start = int(round((energies[0] - _GRID[0]) / _BIN_KEV))
    if start < 0 or start + len(energies) > len(_GRID) or not np.allclose(energies, _GRID[start:start + len(energies)]):
        raise ValueError(f"spekpy returned energy bins {energies[0]:g}–{energies[-1]:g} keV off the 0.5 keV grid "
                         f"at {kvp:g} kVp")
    on_grid = np.zeros(len(_GRID))
    on_grid[start:start + len(energies)] = np.clip(fluence, 0.0, None)
    _element_table(_ALL_ELEMENTS, _GRID)  # warm the tables with the spectrum: later HU calls take ~0.1 ms
    return _readonly(on_grid)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, np.float64)
    a.flags.writeable = False
    return a


# Centres of spekpy's 0.5 keV bins from its first bin (1.25 keV) to the top of the kVp range.
_GRID = _readonly(np.arange(1.25, _KVP_RANGE[1], _BIN_KEV))
_ALL_ELEMENTS = tuple(sorted({el for m in MATERIALS.values() for el, _ in m.composition}))


def _energy_grid(energies_kev) -> np.ndarray:
    energies = np.asarray(energies_kev, np.float64)
    if energies.ndim != 1 or energies.size == 0 or not np.all(energies > 0):
        raise ValueError(f"energies must be a non-empty 1-D array of keV > 0, got shape {energies.shape}")
    return energies


# (symbols, grid bytes) -> (n_elements, E) table; grids are few (one per spectrum bin layout), so it stays small.
_ELEMENT_TABLES: Dict[Tuple[Tuple[str, ...], bytes], np.ndarray] = {}
_ELEMENT_ROWS: Dict[Tuple[str, bytes], np.ndarray] = {}


def _element_table(symbols: Tuple[str, ...], energies: np.ndarray) -> np.ndarray:
    """float64 ``(len(symbols), E)`` total mass attenuation (cm²/g) of each element at ``energies`` (keV), cached."""
    key = (symbols, energies.tobytes())
    table = _ELEMENT_TABLES.get(key)
    if table is None:
        import xraydb  # imported on first use

        rows = []
        for el in symbols:
            row = _ELEMENT_ROWS.get((el, key[1]))
            if row is None:
                row = _readonly(xraydb.mu_elam(el, energies * 1000.0, kind="total"))
                _ELEMENT_ROWS[(el, key[1])] = row
            rows.append(row)
        table = _readonly(np.stack(rows))
        _ELEMENT_TABLES[key] = table
    return table


def _mu_matrix(materials: Sequence[Material], energies: np.ndarray) -> np.ndarray:
    """float64 ``(M, E)`` linear attenuation (1/cm) of ``materials`` at ``energies``: one matrix product."""
    symbols = tuple(sorted({el for m in materials for el, _ in m.composition}))
    index = {el: i for i, el in enumerate(symbols)}
    partial = np.zeros((len(materials), len(symbols)))
    for r, m in enumerate(materials):
        for el, w in m.composition:
            partial[r, index[el]] = m.density * w
    return partial @ _element_table(symbols, energies)


def _effective_mu(materials: Sequence[Material], spectrum: Spectrum, detector: str) -> np.ndarray:
    """float64 ``(M,)`` spectrum-averaged linear attenuation (1/cm) of ``materials``."""
    return _mu_matrix(materials, spectrum.energies_kev) @ spectrum.weights(detector)


def hu_table(materials: Optional[Iterable[MaterialLike]], spectrum: Spectrum,
             detector: str = "energy_integrating") -> Dict[str, float]:
    """HU of several materials through one spectrum (one vectorised pass: ~0.1 ms for the named table).

    Args:
        materials: materials or names of :data:`MATERIALS`; ``None`` for all of :data:`MATERIALS`.
        spectrum: the (hardened) spectrum.
        detector: one of :data:`DETECTORS`.

    Returns:
        material name -> HU.
    """
    mats = [_material(m) for m in (MATERIALS.values() if materials is None else materials)]
    names = [m.name for m in mats]
    if len(set(names)) < len(names):
        raise ValueError(f"materials need distinct names, got {names}")
    mu = _effective_mu([MATERIALS["water"], MATERIALS["air"], *mats], spectrum, detector)
    mu_w, mu_a = mu[0], mu[1]
    return {m.name: float(1000.0 * (v - mu_w) / (mu_w - mu_a)) for m, v in zip(mats, mu[2:])}


def hu(material: MaterialLike, spectrum: Spectrum, detector: str = "energy_integrating") -> float:
    """HU of one material through ``spectrum``: ``1000 (mu - mu_water) / (mu_water - mu_air)``.

    Args:
        material: a :class:`Material` or the name of one in :data:`MATERIALS`.
        spectrum: the (hardened) spectrum.
        detector: ``"energy_integrating"`` (weights ``E * fluence``) or ``"photon_counting"`` (``fluence``).
    """
    m = _material(material)
    return hu_table([m], spectrum, detector)[m.name]


@functools.lru_cache(maxsize=1)
def _water_curve() -> Tuple[np.ndarray, np.ndarray]:
    """Water's linear attenuation on a fine grid (keV, 1/cm), increasing in mu for :func:`np.interp`."""
    energies = np.arange(10.0, 200.0 + 1e-9, 0.01)
    mu = MATERIALS["water"].mu(energies)
    assert np.all(np.diff(mu) < 0), "water attenuation must fall monotonically over 10–200 keV"
    return mu[::-1].copy(), energies[::-1].copy()


def effective_energy(spectrum: Spectrum, detector: str = "energy_integrating") -> float:
    """The monoenergetic energy (keV) whose water attenuation equals the spectrum's effective water attenuation."""
    mu_eff = float(_effective_mu([MATERIALS["water"]], spectrum, detector)[0])
    mu_grid, energies = _water_curve()
    if not mu_grid[0] <= mu_eff <= mu_grid[-1]:
        raise ValueError(f"effective water attenuation {mu_eff:.4f}/cm is outside the 10–200 keV range")
    return float(np.interp(mu_eff, mu_grid, energies))


def hu_per_mg(spectrum: Spectrum, mineral: str = "K2HPO4", fat_fraction: float = 0.0,
              detector: str = "energy_integrating") -> float:
    """Slope of trabecular HU per mg/cm³ of ``mineral`` at fixed marrow (HU per mg/cm³).

    HU is linear in the mineral's partial density in this model (the mineral displaces marrow in proportion), so the
    two-point slope between 0 and 200 mg/cm³ is exact.
    """
    lo = trabecular_bone(0.0, fat_fraction, mineral)
    hi = trabecular_bone(200.0, fat_fraction, mineral)
    values = hu_table([lo, hi], spectrum, detector)
    return (values[hi.name] - values[lo.name]) / 200.0


def hu_per_fat_fraction(spectrum: Spectrum, bmd_mg_cm3: float = 100.0, mineral: str = "K2HPO4",
                        detector: str = "energy_integrating") -> float:
    """Change of trabecular HU per unit marrow fat fraction (0 → 1) at fixed BMD (HU; negative: fat lowers HU).

    Divided by :func:`hu_per_mg` it is the BMD error (mg/cm³) of single-energy QCT per unit fat fraction. Exact
    two-point slope (HU is linear in the fat fraction here).
    """
    red = trabecular_bone(bmd_mg_cm3, 0.0, mineral)
    yellow = trabecular_bone(bmd_mg_cm3, 1.0, mineral)
    values = hu_table([red, yellow], spectrum, detector)
    return values[yellow.name] - values[red.name]
