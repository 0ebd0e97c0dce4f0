"""The ``Volume`` type (a 3-D image on a regular grid in LPS mm) and NIfTI loading.

This module imports no detectron2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple, Union

import numpy as np

from ...errors import BMDError

__all__ = ["Volume", "load_nifti", "INT16_MIN", "INT16_MAX"]

PathLike = Union[str, os.PathLike]
INT16_MIN, INT16_MAX = -32768, 32767


@dataclass
class Volume:
    """A 3-D image on a regular grid in DICOM patient coordinates (LPS, mm).

    Attributes:
        data: array ``(K, J, I)`` = (slice, row, column): HU for CT (float32, or int16 when loaded with
            ``dtype="auto"``/``"int16"`` and every value is an exact integer), label values for label volumes.
        affine: float64 ``(4, 4)`` mapping voxel index ``(i, j, k, 1)`` (column, row, slice) to LPS ``(x, y, z, 1)`` mm.
        meta: identifiers and acquisition facts: ``StudyInstanceUID``, ``SeriesInstanceUID``, ``FrameOfReferenceUID``,
            ``SOPClassUID``, ``SOPInstanceUIDs`` (one per slice, in slice order), ``Modality``, ``KVP``,
            ``Manufacturer``, ``SeriesDescription``, ``source`` (path), ``files`` (per slice) ...
        warnings: one-line strings describing anything odd (uneven spacing, tilt, skipped files, ...).
        source_headers: DICOM input only: source file path → its whole header as the loader read it
            (:class:`bmd_d2.data.dicom.reader.SourceHeader`; ``.dataset(path)`` gives the pydicom dataset), so that
            the DICOM writers need not parse the files again; empty for NIfTI and user-made volumes (the writers then
            read the files named in ``meta["files"]``).
    """

    data: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    source_headers: Dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(K, J, I)`` voxel counts."""
        return tuple(self.data.shape)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size ``(dk, dj, di)`` in mm, array-axis order (length of the affine's columns)."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(n[2]), float(n[1]), float(n[0])

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of voxel (0, 0, 0), float64 ``(3,)``."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the i, j, k axes as columns, float64 ``(3, 3)``."""
        m = self.affine[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` in (i, j, k) order to LPS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map LPS points ``(..., 3)`` mm to continuous voxel indices ``(..., 3)`` in (i, j, k) order."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]



_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_nifti(path: PathLike, dtype=np.float32) -> Volume:
    """Load a NIfTI volume (.nii / .nii.gz) in the ``Volume`` convention.

    NIfTI's RAS world coordinates are converted to LPS (x and y negated); the array is transposed from nibabel's
    ``(i, j, k)`` to ``(K, J, I)``, so NIfTI axis 0 is the column index ``i``. Values are cast to ``dtype``
    (float32 by default; e.g. ``np.int16`` for label volumes; ``"auto"``: int16 when the scaled values are integers
    stored in at most 16 bits that fit int16, else float32). Scaling (scl_slope/inter) is applied.

    Raises:
        BMDError: missing/unreadable file or not a 3-D image.
    """
    import nibabel as nib

    path = str(path)
    if not os.path.isfile(path):
        raise BMDError("no such NIfTI file", path=path)
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as ex:  # nibabel raises several types for broken files
        raise BMDError(f"cannot read NIfTI ({type(ex).__name__}: {ex})", path=path) from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise BMDError(f"expected a 3-D volume, got shape {arr.shape}", path=path)
    if isinstance(dtype, str) and dtype == "auto":
        fits = arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.dtype != np.uint16
        dtype = np.int16 if fits or (arr.dtype == np.uint16 and (arr.size == 0 or int(arr.max()) <= INT16_MAX)) \
            else np.float32
    data = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)), dtype=dtype)
    affine = _RAS_TO_LPS @ img.affine.astype(np.float64)
    return Volume(data=data, affine=affine, meta={"source": path, "format": "nifti"}, warnings=[])

