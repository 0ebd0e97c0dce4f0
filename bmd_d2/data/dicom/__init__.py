"""CT series ingestion: DICOM (folder, file list or one multi-frame file) or NIfTI → HU ``Volume`` with its geometry.

This package imports no detectron2. Its layers, lowest first:

* :mod:`.volume`: the :class:`Volume` type and NIfTI loading.
* :mod:`.reader`: one DICOM file: ``read_header`` and the stored pixels (``read_frame_into`` / ``decode_frame`` /
  ``read_multiframe``); a fast tag walker and direct pixel reads, pydicom where those decline.
* :mod:`.pixels`: stored values → HU slices (float32 or exact int16, threads).
* :mod:`.series`: the series rules (discovery, grouping, choice, checks, sorting, spacing, resampling) and
  :func:`load_series` / :func:`load_volume`; see its docstring for the documented contract.
"""
from .series import SeriesInfo, find_dicom_files, list_series, load_series, load_volume
from .volume import Volume, load_nifti

__all__ = [
    "Volume",
    "SeriesInfo",
    "find_dicom_files",
    "list_series",
    "load_series",
    "load_nifti",
    "load_volume",
]
