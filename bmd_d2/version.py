"""The bmd_d2 version (one place; stored in exported weights and in the DICOM objects it writes)."""
__version__ = "0.1.0"
