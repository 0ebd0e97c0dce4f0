"""Reports of a measured study: tables (CSV, terminal), overlay PNG, NIfTI masks, DICOM SEG/SR/SC, the study folder.

Public API::

    from bmd_d2.reports import write_study
    paths = write_study(result, "out/study1", masks=True, dicom=("seg", "sr", "sc"))

Modules: :mod:`.tables` (CSV columns and rows, ``result.json``), :mod:`.overlay` (PNG), :mod:`.nifti`
(``masks.nii.gz``), :mod:`.dicom_sources` (source headers re-read and prepared), :mod:`.dicom` (the DICOM objects),
:mod:`.study` (one study's folder, in order and atomically; finished-study checks). Every file goes through
:func:`bmd_d2.utils.files.atomic_path`.
"""
from .dicom import write_dicom_outputs
from .dicom_sources import DicomOutputsUnavailable
from .nifti import mask_label_image, write_masks_nifti
from .overlay import write_overlay
from .study import (MASKS_NII, OPTIONAL_OUTPUTS, OVERLAY_PNG, RESULT_JSON, VERTEBRAE_CSV, is_finished,
                    is_finished_result, one_line_reason, read_result, remove_stale_temp_files, requested_outputs,
                    write_study)
from .tables import (STUDY_COLUMNS, VERTEBRA_COLUMNS, csv_text, format_table, study_row, vertebra_rows, write_csv,
                     write_json)

__all__ = [
    "write_study", "requested_outputs", "is_finished", "is_finished_result", "read_result", "one_line_reason",
    "remove_stale_temp_files", "OPTIONAL_OUTPUTS", "RESULT_JSON", "VERTEBRAE_CSV", "OVERLAY_PNG", "MASKS_NII",
    "VERTEBRA_COLUMNS", "STUDY_COLUMNS", "csv_text", "vertebra_rows", "study_row", "format_table", "write_csv",
    "write_json", "write_overlay", "mask_label_image", "write_masks_nifti", "write_dicom_outputs",
    "DicomOutputsUnavailable",
]
