"""Synthetic lumbar-spine CT phantoms whose vertebral BMD is known by construction.

The package renders a CT study (HU volume + geometry), its vertebral-body and trabecular-core label volumes, and the
true BMD of each vertebra; it writes the study as a CT DICOM series (pydicom), NIfTI label volumes (nibabel), a
preview PNG and a JSON record of every random parameter. It imports no detectron2. One module per concern:
:mod:`.options` (what to generate, seeds), :mod:`.anatomy` (the random draws, spine frames, layout),
:mod:`.physics` (tube spectra, material HU from elemental composition), :mod:`.tissues` (generator v5: every
tissue's HU of a study from its scanner and patient), :mod:`.geometry` (voxel grid, partial-volume shapes),
:mod:`.background` (soft tissue), :mod:`.render` (spine, PSF, noise), :mod:`.writers` (DICOM, NIfTI, PNG, JSON,
CSV), :mod:`.dataset` (study and dataset loops), :mod:`.cli` (``bmd-make-phantoms``).

Generator versions (``PhantomOptions.generator_version``, written to ``phantom.json``): **5** (default) paints every
tissue from a drawn X-ray spectrum (80–140 kVp, filtration, the patient's beam hardening) and the patient's
composition (marrow fat by age, fat-infiltrated muscle, hematocrit, iodine of a contrast phase), plus a scanner
calibration error of a few HU; **4** renders exactly what the generator rendered before v5 for the same seed and
options (one free calibration line ``HU = a + b * density`` for every bone, free soft-tissue HU). v5 draws come after
every v4 draw, so a v5 study has its v4 twin's anatomy, geometry, labels and BMD. **6** (issue 18) is v5 plus a pelvis
joined to the sacrum at sacroiliac joints and transitional anatomy (11 / 13 rib pairs, sacralised L5, lumbarised S1;
truth in ``params["level_anchors"]``), drawn after every v5 draw (:mod:`.anatomy`); the level-anchor benchmarks use
it. **7** (issue 19) is v6 with the patient's trabecular texture and sclerotic islands drawn per vertebra from the
patient's own ``texture_seed`` in the vertebra's frame (:func:`.geometry.local_texture`): a re-scan
(``rescan_seed``) re-images the same bone (noise-free core HU at the same anatomical points correlate 0.99 between
re-scans; v6 re-drew the texture on the shifted grid: correlation ~0), so re-scan precision measures the
measurement, not a new skeleton.

Ground truth (the contract every consumer relies on)
----------------------------------------------------
* ``bmd_mg_cm3``: a vertebra's BMD is the **mean mineral density of its trabecular core**, in mg/cm³ of
  K2HPO4-equivalent mineral. The density field inside the core is textured (filtered noise, basivertebral vein) and
  is shifted so that its mean over the core voxels (``cores.nii.gz == label``) equals the drawn BMD exactly. In v5
  the core's HU is linear in that density at the level's marrow (:func:`.physics.trabecular_bone`), so its mean HU is
  the physics HU of the drawn BMD exactly (``calibrated_hu``).
* ``trabecular_hu``: the mean HU over the same core voxels of the image **as written to DICOM without noise**: after
  the scanner calibration ``HU = a + b * density``, partial volume and PSF blur, before noise and quantisation. It
  therefore differs slightly from ``calibrated_hu`` near the cortical shell (partial volume is part of the physics a
  measurement must handle). ``calibrated_hu``: the core's HU without partial volume, blur or noise (v4:
  ``calib_a + calib_b * bmd``; v5: the level's trabecular bone through the spectrum, after the scanner's gain and
  offset). Reading the DICOM back and averaging the core gives ``trabecular_hu`` up to the noise (σ / sqrt(N) with
  correlated noise) and quantisation (``RescaleSlope / 2``).
* v5 per level also: ``fat_fraction`` (the level's marrow fat, yellow-marrow volume share), ``qct_bmd_mg_cm3`` (what
  an ideal phantom QCT reads of the trabecular bone: ``(calibrated_hu - intercept) / slope`` of the study's
  ``qct_calibration``, so the marrow-fat confounder of single-energy QCT is in it, and the partial volume of the
  cortical shell in the core's rim is not: a QCT ROI keeps away from the cortex; until 2026-12-02 it was computed
  from ``trabecular_hu``, up to 8 HU higher on 1 mm series) and ``fat_bias_mg_cm3`` (``qct_bmd_mg_cm3 -
  bmd_mg_cm3``).
* v5 per study (``params`` in ``phantom.json``): ``kvp``, ``anode_angle_deg``, ``al_mm``, ``cu_mm``, ``water_mm``
  (AAPM TG 220 water-equivalent diameter at L3, the beam hardening), ``effective_energy_kev``, ``hu_per_mg``
  (imaged trabecular HU per mg/cm³ K2HPO4 at the patient's marrow), ``hu_offset`` / ``hu_gain`` (the scanner's
  calibration error: image = gain · HU + offset), ``tissue_hu`` (imaged noise-free HU of ``air``, ``fat``, ``muscle``,
  ``blood`` (unenhanced), ``aorta``, ``liver``, ``kidney``, ``cortical``, ``disc``, ``csf``, ``marrow``),
  ``qct_calibration`` (``slope``, ``intercept``, ``rods_mg_cm3``, ``rods_hu``: K2HPO4-in-water rods through the same
  spectrum and calibration error, fitted by a line), ``calib_a`` / ``calib_b`` (= that line's intercept and slope:
  a ``--calibration`` file made of them behaves like a phantom scanned with the patient), ``age``, ``patient_sex``,
  ``marrow_fat_fraction`` (+ ``_levels``), ``contrast_phase``, ``iodine_mg_ml`` (``aorta``, ``ivc``, ``liver``,
  ``kidney``, ``organ``), ``kvp_tag_written``, ``contrast_tag_written``.
* ``labels.nii.gz``: vertebral bodies (cortical shell + core, partial-volume fraction ≥ 0.5), values from
  :mod:`bmd_d2.levels` (T11 = 1 … S1 = 8). ``cores.nii.gz``: trabecular cores (fraction ≥ 0.5, minus voxels within
  2 mm of metal), same values. A level is labelled (and listed in ``bmd.csv``) when at least half of its body height
  lies inside the scanned range.

Coordinates
-----------
Patient coordinates are DICOM LPS millimetres (x → patient left, y → posterior, z → superior). The in-memory volume is
``(K, J, I)`` = (slice, row, column) with ``affine`` mapping ``(i, j, k, 1)`` → LPS; slices are stored inferior →
superior (``k`` grows with ``z``). DICOM slices use ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``. NIfTI files are
RAS: their affine is ``diag(-1, -1, 1, 1) @ affine`` and their data array is indexed ``(i, j, k)`` (the transpose of the
in-memory array), so ``nibabel.load(...).affine`` maps the same voxels to the same physical points.

The ranges of every random parameter are listed in :mod:`bmd_d2.phantoms.anatomy`.
"""
from .dataset import generate_dataset, generate_study
from .options import (CONTRAST_PHASES, EXAMPLE_SEED, GENERATOR_VERSION, GENERATOR_VERSIONS, TRANSFER_SYNTAXES,
                      DicomStyle, PhantomOptions, PhantomStudy, example_options, study_id_for, study_seed)
from .writers import CSV_FIELDS, write_bmd_csv, write_dicom_series, write_preview, write_study

__all__ = [
    "PhantomOptions",
    "PhantomStudy",
    "DicomStyle",
    "study_seed",
    "study_id_for",
    "generate_study",
    "write_study",
    "write_dicom_series",
    "write_preview",
    "write_bmd_csv",
    "generate_dataset",
    "example_options",
    "EXAMPLE_SEED",
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "CONTRAST_PHASES",
    "TRANSFER_SYNTAXES",
    "CSV_FIELDS",
]
