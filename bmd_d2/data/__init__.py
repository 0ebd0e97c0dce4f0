"""Data: DICOM/NIfTI ingestion, sagittal images, phantoms, dataset registration and mapping."""
from .levels import LEVELS, LEVEL_TO_LABEL, LABEL_TO_LEVEL, THING_CLASSES
