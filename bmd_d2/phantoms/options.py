"""What a phantom study is made of: the generation options, the DICOM encoding, the in-memory study and its seeds.

Every field of :class:`PhantomOptions` left at ``None`` is drawn at random per study; a value fixes it for every
study. The options are grouped by concern (scan, patient, pixel encoding, series layout and outputs) into a chain of
small dataclasses; :class:`PhantomOptions` is the one to construct, with every field as a keyword.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "CONTRAST_PHASES",
    "EXAMPLE_SEED",
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "TRANSFER_SYNTAXES",
    "DicomStyle",
    "PhantomOptions",
    "PhantomStudy",
    "example_options",
    "study_id_for",
    "study_seed",
]

# name -> pydicom UID name; "explicit"/"implicit" are native, the rest go through pydicom's encoders.
TRANSFER_SYNTAXES = {
    "explicit": "ExplicitVRLittleEndian",
    "implicit": "ImplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpegls": "JPEGLSLossless",
    "j2k": "JPEG2000Lossless",
}

# Version of the rendering (bumped when the same seed gives a different study): 1 first release; 2 realism (sizes,
# cortex, endplates, discs, muscle, islands, coarse pixels); 3 endplate density, body depth; 4 ring-shaped posterior
# elements; 5 X-ray physics (every tissue's HU from the scanner's spectrum and the patient's composition,
# :mod:`bmd_d2.phantoms.tissues`). Written to phantom.json as ``generator_version``; the default of
# ``PhantomOptions.generator_version``. Versions 4, 5 and 6 can be generated (4 and 5 bit-for-bit as before); 6 adds
# the pelvis of the 3-D sacrum anchor (sacral lateral masses meeting the ilia at sacroiliac joints) and transitional
# anatomy (11 / 13 rib pairs, 4 / 6 lumbar vertebrae), drawn after every v5 draw; 7 (issue 19) is v6 with the
# patient's trabecular texture fixed in each vertebra's own frame (a re-scan re-images the same bone).
GENERATOR_VERSION = 5
GENERATOR_VERSIONS = (4, 5, 6, 7)
RIB_PAIRS = (11, 12, 13)
LUMBAR_VERTEBRAE = (4, 5, 6)
CONTRAST_PHASES = ("none", "arterial", "portal_venous")

# Seed of the bundled example study (``tools/demo.py``), drawn with :func:`example_options`.
EXAMPLE_SEED = 20261125


@dataclass
class _ScanOptions:
    """Scanner and reconstruction of the image.

    Attributes:
        matrix: rows = columns of each slice (512 for clinical studies; 64–128 for tests).
        pixel_spacing: mm per pixel in-plane (random 0.5–0.98, or 1.5–3.0 for 15 % of studies, whose matrix then
            shrinks to keep the field of view; fixing it disables the coarse share).
        slice_thickness: reconstructed thickness in mm (random from 0.625–3).
        slice_spacing: mm between slice centres (random: = thickness, or 50–100 % of it when overlapping).
        max_slices: cap on the number of slices; the top of the scan range is cut to respect it.
        noise_sd: noise σ in HU (random 8–30 HU at 2.5 mm, scaled by sqrt(2.5/thickness)); 0 disables noise.
        psf_sigma_mm: in-plane Gaussian PSF σ in mm (random 0.35–0.8); 0 disables blur.
        kvp: tube potential (generator v5 only: random among 80, 100, 110, 120, 130, 140 kVp; any multiple of 0.5
            within 80–140 when fixed).
    """

    matrix: int = 512
    pixel_spacing: Optional[float] = None
    slice_thickness: Optional[float] = None
    slice_spacing: Optional[float] = None
    max_slices: int = 400
    noise_sd: Optional[float] = None
    psf_sigma_mm: Optional[float] = None
    kvp: Optional[float] = None


@dataclass
class _PatientOptions(_ScanOptions):
    """The patient and the events in the scanned range.

    Attributes:
        bmd_mg_cm3: patient mean BMD (random across ACR categories within 30–250).
        contrast: iodinated contrast in aorta / kidneys / liver (random 40 %).
        table: patient table in the field of view (random 80 %).
        fracture: force (True) or forbid (False) one compression fracture (random 8 %).
        metal: force or forbid pedicle screws and rods (random 6 %).
        scoliosis: allow scoliosis / axial rotation (False: straight coronal alignment).
        age: patient age in years (generator v5 only: random 20–90); sets the marrow and muscle fat.
        marrow_fat_fraction: the patient's mean marrow fat (yellow-marrow volume share, generator v5 only; random
            ``0.30 + 0.005 (age - 40) + N(0, 0.06)`` within 0.10–0.80); each level adds its own N(0, 0.02).
        contrast_phase: one of :data:`CONTRAST_PHASES` (generator v5 only; random: arterial or portal-venous half
            each when the study has contrast); fixing it also fixes ``contrast``.
    """

    bmd_mg_cm3: Optional[float] = None
    contrast: Optional[bool] = None
    table: Optional[bool] = None
    fracture: Optional[bool] = None
    metal: Optional[bool] = None
    scoliosis: bool = True
    age: Optional[int] = None
    marrow_fat_fraction: Optional[float] = None
    contrast_phase: Optional[str] = None


@dataclass
class _PixelOptions(_PatientOptions):
    """How the pixels are stored in DICOM.

    Attributes:
        storage: "signed" (int16) or "unsigned" (uint16) pixel storage.
        rescale: (slope, intercept) pair (random among common vendor choices fitting ``storage``).
        bits_stored: 12 or 16 (12 only with unsigned storage; HU then saturates at intercept + 4095·slope).
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES` keys (random, 50 % uncompressed).
    """

    storage: Optional[str] = None
    rescale: Optional[Tuple[float, float]] = None
    bits_stored: Optional[int] = None
    transfer_syntax: Optional[str] = None


@dataclass
class PhantomOptions(_PixelOptions):
    """What to generate. ``None`` means "draw at random per study"; a value fixes it for every study.

    Random draws are made in a fixed order whatever the options, so fixing one option never changes the others.
    The scan, patient and pixel fields are documented on the groups this class extends (``matrix``,
    ``pixel_spacing``, ``slice_thickness``, ``slice_spacing``, ``max_slices``, ``noise_sd``, ``psf_sigma_mm``,
    ``kvp``; ``bmd_mg_cm3``, ``contrast``, ``table``, ``fracture``, ``metal``, ``scoliosis``, ``age``,
    ``marrow_fat_fraction``, ``contrast_phase``; ``storage``, ``rescale``, ``bits_stored``, ``transfer_syntax``), in
    that order, before the fields below.

    Attributes:
        shuffle_names: random file names instead of ``IM00001.dcm`` in instance order.
        reverse_instances: InstanceNumber 1 at the top (superior) slice instead of the bottom one.
        fov_padding: pixels outside the reconstruction circle set to a padding value (-3024 HU, signed storage only).
        optional_tags: write optional tags (SliceLocation, SpacingBetweenSlices, WindowCenter/Width).
        preview: write ``preview.png`` with :func:`~bmd_d2.phantoms.writers.write_study`.
        rescan_seed: None for the study itself; an integer gives a *re-scan* of the same patient on the same scanner
            (for precision studies): every anatomy, BMD, scanner and protocol parameter is kept, while the noise, the
            patient position (body and reconstruction-centre offsets, table z) and the start of the scan range are
            redrawn from ``(seed, rescan_seed)``. Each core's mean density still equals the drawn BMD exactly. Up to
            v6 the voxel-level trabecular texture is re-drawn on the shifted grid (another bone: a pessimistic
            re-scan); from v7 it is the patient's, fixed in each vertebra's frame.
        generator_version: one of :data:`GENERATOR_VERSIONS` (default :data:`GENERATOR_VERSION`); 4 renders exactly
            what generator v4 rendered for the same seed and options (``kvp``, ``age``, ``marrow_fat_fraction`` and
            ``contrast_phase`` are v5 options).
        rib_pairs: v6 and later: rib-bearing vertebrae down to the last rib, 11 (no T12 rib), 12 or 13 (a lumbar rib on
            L1); None draws (6 % each of 11 and 13).
        lumbar_vertebrae: v6 and later: 5, 4 (sacralised L5: L5 joins the sacral mass and the ilia, a rudimentary L5/S1
            disc) or 6 (lumbarised S1: S1 free of the ilia, a full S1/S2 disc); None draws (5 % each of 4 and 6).
    """

    shuffle_names: Optional[bool] = None
    reverse_instances: Optional[bool] = None
    fov_padding: Optional[bool] = None
    optional_tags: Optional[bool] = None
    preview: bool = True
    rescan_seed: Optional[int] = None
    generator_version: int = GENERATOR_VERSION
    rib_pairs: Optional[int] = None
    lumbar_vertebrae: Optional[int] = None

    @classmethod
    def tiny(cls, **overrides) -> "PhantomOptions":
        """Small, fast studies for tests: 96² matrix of 2 mm pixels, 3 mm slices, plain uncompressed DICOM."""
        base = dict(
            matrix=96, pixel_spacing=2.0, slice_thickness=3.0, slice_spacing=3.0, storage="signed",
            rescale=(1.0, -1024.0), bits_stored=16, transfer_syntax="explicit", shuffle_names=False,
            reverse_instances=False, fov_padding=False, optional_tags=True,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible combinations (checked before any rendering)."""
        if self.matrix < 32:
            raise ValueError(f"matrix must be >= 32, got {self.matrix}")
        if self.storage not in (None, "signed", "unsigned"):
            raise ValueError(f"storage must be 'signed' or 'unsigned', got {self.storage!r}")
        if self.transfer_syntax not in (None, *TRANSFER_SYNTAXES):
            raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, "
                             f"got {self.transfer_syntax!r}")
        if self.bits_stored not in (None, 12, 16):
            raise ValueError(f"bits_stored must be 12 or 16, got {self.bits_stored}")
        if self.bits_stored == 12 and self.storage == "signed":
            raise ValueError("bits_stored=12 is only offered with unsigned storage")
        if self.fov_padding and self.storage == "unsigned":
            raise ValueError("fov_padding needs signed storage (the padding value -3024 HU is negative)")
        if self.rescan_seed is not None and (not isinstance(self.rescan_seed, (int, np.integer))
                                             or isinstance(self.rescan_seed, bool) or self.rescan_seed < 0):
            raise ValueError(f"rescan_seed must be None or a non-negative integer, got {self.rescan_seed!r}")
        if self.generator_version not in GENERATOR_VERSIONS:
            raise ValueError(f"generator_version must be one of {GENERATOR_VERSIONS}, got {self.generator_version!r}")
        v5_only = {k: getattr(self, k) for k in ("kvp", "age", "marrow_fat_fraction", "contrast_phase")
                   if getattr(self, k) is not None}
        if v5_only and self.generator_version < 5:
            raise ValueError(f"{', '.join(sorted(v5_only))} need generator_version 5, got {self.generator_version}")
        v6_only = {k: getattr(self, k) for k in ("rib_pairs", "lumbar_vertebrae") if getattr(self, k) is not None}
        if v6_only and self.generator_version < 6:
            raise ValueError(f"{', '.join(sorted(v6_only))} need generator_version 6, got {self.generator_version}")
        if self.rib_pairs not in (None, *RIB_PAIRS):
            raise ValueError(f"rib_pairs must be one of {RIB_PAIRS}, got {self.rib_pairs!r}")
        if self.lumbar_vertebrae not in (None, *LUMBAR_VERTEBRAE):
            raise ValueError(f"lumbar_vertebrae must be one of {LUMBAR_VERTEBRAE}, got {self.lumbar_vertebrae!r}")
        if self.kvp is not None and (not 80.0 <= self.kvp <= 140.0 or (2.0 * self.kvp) % 1.0):
            raise ValueError(f"kvp must be within 80–140 kV in steps of 0.5 kV, got {self.kvp}")
        if self.age is not None and not 0 <= self.age <= 120:
            raise ValueError(f"age must be within 0–120 years, got {self.age}")
        if self.marrow_fat_fraction is not None and not 0.0 <= self.marrow_fat_fraction <= 0.95:
            raise ValueError(f"marrow_fat_fraction must be within 0–0.95, got {self.marrow_fat_fraction}")
        if self.contrast_phase not in (None, *CONTRAST_PHASES):
            raise ValueError(f"contrast_phase must be one of {CONTRAST_PHASES}, got {self.contrast_phase!r}")
        if (self.contrast_phase is not None and self.contrast is not None
                and self.contrast != (self.contrast_phase != "none")):
            raise ValueError(f"contrast={self.contrast} contradicts contrast_phase={self.contrast_phase!r}")


@dataclass
class DicomStyle:
    """How a study's DICOM series is encoded (all choices decode to the same HU up to ``slope / 2``)."""

    storage: str = "signed"
    slope: float = 1.0
    intercept: float = -1024.0
    bits_stored: int = 16
    transfer_syntax: str = "explicit"
    shuffle_names: bool = False
    reverse_instances: bool = False
    fov_padding: bool = False
    optional_tags: bool = True

    @property
    def hu_range(self) -> Tuple[float, float]:
        """(min, max) HU representable with this storage, bits and rescale."""
        if self.storage == "signed":
            lo, hi = -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        else:
            lo, hi = 0, 2 ** self.bits_stored - 1
        return lo * self.slope + self.intercept, hi * self.slope + self.intercept

    def stored_values(self, hu: np.ndarray) -> np.ndarray:
        """HU → stored integers (int16 or uint16) with this slope/intercept, rounded and clipped; same shape."""
        lo, hi = self.hu_range
        raw = np.rint((np.clip(hu, lo, hi) - self.intercept) / self.slope)
        return raw.astype(np.int16 if self.storage == "signed" else np.uint16)


@dataclass
class PhantomStudy:
    """An in-memory phantom study.

    Attributes:
        study_id: identifier used for folder names and in ``bmd.csv``.
        seed: the integer seed the study was drawn from.
        hu: float32 ``(K, J, I)`` HU as it will be written (noise included, not yet quantised).
        affine: float64 ``(4, 4)`` voxel ``(i, j, k, 1)`` → LPS mm.
        labels: uint8 ``(K, J, I)`` vertebral bodies, values from :mod:`bmd_d2.levels`.
        cores: uint8 ``(K, J, I)`` trabecular cores (ground-truth BMD region), same values.
        truth: one dict per labelled level, cranial → caudal: ``level``, ``label``, ``bmd_mg_cm3``, ``trabecular_hu``,
            ``calibrated_hu`` (the core's HU without noise, blur or partial volume: a + b·bmd in v4),
            ``core_voxels``, ``body_voxels``, ``in_view``, ``fractured``, ``metal``; v5 adds ``fat_fraction``,
            ``qct_bmd_mg_cm3`` and ``fat_bias_mg_cm3`` (see :mod:`bmd_d2.phantoms`).
        params: every random parameter (JSON-serialisable), written as ``phantom.json``.
        style: the DICOM encoding of this study.
        slice_thickness: mm.
        generator_version: the generator version that rendered it (written to ``phantom.json``).
    """

    study_id: str
    seed: int
    hu: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    cores: np.ndarray
    truth: List[Dict]
    params: Dict
    style: DicomStyle
    slice_thickness: float
    generator_version: int = GENERATOR_VERSION

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """(dk, dj, di) voxel spacing in mm, array-axis order."""
        return (float(self.affine[2, 2]), float(self.affine[1, 1]), float(self.affine[0, 0]))

    def quantized_hu(self) -> np.ndarray:
        """float32 ``(K, J, I)``: the HU a DICOM reader gets back (stored values × slope + intercept)."""
        return self.style.stored_values(self.hu).astype(np.float32) * self.style.slope + self.style.intercept


def example_options() -> PhantomOptions:
    """The options of the bundled example study (``tools/demo.py``): a 512² CT at 1.25 mm, BMD about 105 mg/cm³,
    no fracture, metal or contrast; generated with :data:`EXAMPLE_SEED`."""
    return PhantomOptions(slice_thickness=1.25, slice_spacing=1.25, pixel_spacing=0.78, bmd_mg_cm3=105.0,
                          fracture=False, metal=False, contrast=False, transfer_syntax="explicit")


def study_seed(base_seed: int, index: int) -> int:
    """Deterministic 63-bit seed of study ``index`` of a dataset drawn with ``base_seed``."""
    ss = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def study_id_for(index: int, prefix: str = "phantom") -> str:
    """Folder / CSV identifier of study ``index``: ``phantom_00042``."""
    return f"{prefix}_{index:05d}"
