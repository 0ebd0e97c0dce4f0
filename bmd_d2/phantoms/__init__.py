"""Synthetic lumbar-spine CT phantoms whose vertebral BMD is known by construction.

The package renders a CT study (HU volume + geometry), its vertebral-body and trabecular-core label volumes, and the
true BMD of each vertebra; it writes the study as a CT DICOM series (pydicom), NIfTI label volumes (nibabel), a
preview PNG and a JSON record of every random parameter. It imports no detectron2. One module per concern:
:mod:`.options` (what to generate, seeds), :mod:`.anatomy` (the random draws, spine frames, layout),
:mod:`.geometry` (voxel grid, partial-volume shapes), :mod:`.background` (soft tissue), :mod:`.render` (spine, PSF,
noise), :mod:`.writers` (DICOM, NIfTI, PNG, JSON, CSV), :mod:`.dataset` (study and dataset loops), :mod:`.cli`
(``bmd-make-phantoms``).

Ground truth (the contract every consumer relies on)
----------------------------------------------------
* ``bmd_mg_cm3``: a vertebra's BMD is the **mean mineral density of its trabecular core**. The density field inside
  the core is textured (filtered noise, basivertebral vein) and is shifted so that its mean over the core voxels
  (``cores.nii.gz == label``) equals the drawn BMD exactly.
* ``trabecular_hu``: the mean HU over the same core voxels of the image **as written to DICOM without noise**: after
  the scanner calibration ``HU = a + b * density``, partial volume and PSF blur, before noise and quantisation. It
  therefore differs slightly from ``a + b * bmd`` near the cortical shell (partial volume is part of the physics a
  measurement must handle); ``phantom.json`` records ``a``, ``b`` and ``a + b * bmd`` per level. Reading the DICOM back
  and averaging the core gives ``trabecular_hu`` up to the noise (σ / sqrt(N) with correlated noise) and
  quantisation (``RescaleSlope / 2``).
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
from .options import (EXAMPLE_SEED, GENERATOR_VERSION, TRANSFER_SYNTAXES, DicomStyle, PhantomOptions, PhantomStudy,
                      example_options, study_id_for, study_seed)
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
    "TRANSFER_SYNTAXES",
    "CSV_FIELDS",
]
