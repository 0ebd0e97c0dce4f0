"""Data: DICOM/NIfTI loading, sagittal images, dataset registration and mapping (the phantom generator is
:mod:`bmd_d2.phantoms`)."""
from bmd_d2.levels import LEVELS, LEVEL_TO_LABEL, LABEL_TO_LEVEL, THING_CLASSES
from .dicom import Volume, list_series, load_nifti, load_series, load_volume
from .sagittal import SagittalImage, find_midsagittal_plane, make_sagittal
from .datasets import prepare_sagittal_dataset, register_all_bmd_datasets, register_bmd_dataset, register_bmd_user_dataset
from .mapper import BMDDatasetMapper

register_all_bmd_datasets()  # lazy: registers names only, reads no folder
