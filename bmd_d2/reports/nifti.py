"""The NIfTI label volume of the measured masks (``masks.nii.gz``), in the geometry of the source volume."""
import numpy as np

from bmd_d2.levels import LEVEL_TO_LABEL
from bmd_d2.measure.result import StudyResult
from bmd_d2.utils.files import atomic_path


def slab_thickness_mm(sagittal) -> float:
    """Thickness (mm) of the slab the sagittal measurement covered: channels × channel spacing (the masks of
    ``masks.nii.gz`` and of the DICOM SEG fill it around the mid-sagittal plane)."""
    return np.asarray(sagittal.hu).shape[0] * float(np.linalg.norm(np.asarray(sagittal.transform)[:3, 2]))


def mask_label_image(result: StudyResult) -> np.ndarray:
    """uint8 ``(H, W)`` sagittal label image of the vertebrae: level label (T11 = 1 … S1 = 8), unnamed ones 9, 10, …"""
    H, W = np.asarray(result.sagittal.hu).shape[1:]
    lab = np.zeros((H, W), np.uint8)
    extra = 9
    for v in result.vertebrae:
        if v.mask is None:
            continue
        if v.level:
            value = LEVEL_TO_LABEL[v.level]
        else:
            value, extra = extra, extra + 1
        lab[v.mask & (lab == 0)] = value
    return lab


def write_masks_nifti(result: StudyResult, path: str):
    """Label volume (NIfTI, geometry of the source volume) of the measured sagittal masks.

    Values as :func:`mask_label_image`; the masks fill the slab the sagittal measurement covered (the 3 slices:
    ``NUM_SLICES × channel spacing`` mm thick) around the mid-sagittal plane. Needs ``result.volume``.
    """
    import nibabel as nib

    from bmd_d2.data.sagittal import sagittal_mask_to_volume

    vol, sag = result.volume, result.sagittal
    if vol is None or sag is None:
        raise ValueError("the result holds no volume/sagittal image to map the masks into")
    lab = sagittal_mask_to_volume(sag, mask_label_image(result), tuple(vol.data.shape), vol.affine,
                                  thickness_mm=slab_thickness_mm(sag))
    data = np.transpose(np.asarray(lab).astype(np.uint8), (2, 1, 0))  # (K, J, I) -> NIfTI (i, j, k)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine)  # LPS -> RAS
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
