"""Tiny synthetic CT series written with pydicom, for the loader/sagittal tests (independent of the phantom generator).

``block_phantom`` makes an HU volume with a body ellipse, a column of block "vertebrae" (cortical shell, trabecular core,
discs between them) and a spinal canal behind; ``write_series`` writes any HU volume as a CT series with options for
the DICOM variations the loader must handle.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def block_phantom(shape=(40, 64, 64), spacing=(2.0, 2.0, 2.0), centre_x_mm=0.0, rotation_deg=0.0,
                  trab_hu=180.0, seed=0):
    """HU volume (K, J, I) float32 with a spine of block vertebrae along k (k = feet → head).

    The spine's mid-sagittal plane is at lateral offset ``centre_x_mm`` from the volume centre and rotated by
    ``rotation_deg`` about the cranio-caudal axis. Returns (hu, vertebra label volume uint8 (K, J, I)).
    """
    K, J, I = shape
    dk, dj, di = spacing
    rng = np.random.default_rng(seed)
    z = (np.arange(K) - (K - 1) / 2) * dk
    y = (np.arange(J) - (J - 1) / 2) * dj
    x = (np.arange(I) - (I - 1) / 2) * di
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    body = (X / (0.45 * I * di)) ** 2 + (Y / (0.42 * J * dj)) ** 2 <= 1
    hu[body] = 40.0
    th = np.radians(rotation_deg)
    # spine coordinates: u lateral, v anterior(-)/posterior(+)
    u = (X - centre_x_mm) * np.cos(th) + Y * np.sin(th)
    v = -(X - centre_x_mm) * np.sin(th) + Y * np.cos(th)
    labels = np.zeros(shape, np.uint8)
    vb_half_u, vb_v0, vb_v1 = 0.2 * I * di, -0.05 * J * dj, 0.15 * J * dj
    vert_h, disc_h = 12.0, 4.0
    period = vert_h + disc_h
    z0 = z[0] + 2.0
    in_body_xy = (np.abs(u) <= vb_half_u) & (v >= vb_v0) & (v <= vb_v1)
    shell_xy = in_body_xy & ~((np.abs(u) <= vb_half_u - 2.5) & (v >= vb_v0 + 2.5) & (v <= vb_v1 - 2.5))
    level = 0
    while z0 + vert_h <= z[-1] and level < 8:
        zs = (Z >= z0) & (Z < z0 + vert_h)
        vb = zs & in_body_xy
        labels[vb] = 8 - level  # caudal-most = highest label
        hu[vb] = trab_hu
        shell = zs & (shell_xy | (np.abs(Z - z0) < 1.5) | (np.abs(Z - z0 - vert_h + 1) < 1.5)) & in_body_xy
        hu[shell] = 700.0
        disc = (Z >= z0 + vert_h) & (Z < z0 + period) & in_body_xy
        hu[disc] = 90.0
        # posterior elements: ring around the canal and a spinous process
        canal_v = vb_v1 + 8.0
        ring = zs & (np.hypot(u, v - canal_v) <= 9.0) & (np.hypot(u, v - canal_v) > 5.0)
        hu[ring] = 600.0
        spinous = zs & (np.abs(u) <= 2.5) & (v > canal_v + 9.0) & (v < canal_v + 25.0)
        hu[spinous] = 500.0
        z0 += period
        level += 1
    hu += rng.normal(0, 8, shape).astype(np.float32)
    return hu.astype(np.float32), labels


def _base_dataset(study_uid, series_uid, for_uid, modality="CT"):
    ds = Dataset()
    ds.PatientName = "SYNTHETIC^FIXTURE"
    ds.PatientID = "SYN0001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.Manufacturer = "bmd_d2 tests"
    ds.KVP = "120"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "fixture"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def write_series(folder, hu, spacing=(2.0, 2.0, 2.0), *, origin=(-100.0, -100.0, -300.0),
                 iop=(1, 0, 0, 0, 1, 0), signed=True, slope=1.0, intercept=-1024.0, bits_stored=16,
                 transfer_syntax=ImplicitVRLittleEndian, shuffle_names=True, reverse_instance=True,
                 tilt_mm_per_slice=0.0, positions: Optional[Sequence[float]] = None, omit=(), modality="CT",
                 series_uid=None, study_uid=None, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), per_slice_slope=False,
                 private_block=True, prefix="img", seed=0):
    """Write ``hu`` (K, J, I) as a single-frame CT series into ``folder``; returns the list of paths (slice order).

    ``positions`` (K,) mm along the normal overrides the regular ``spacing[0]`` grid (for gaps / uneven spacing);
    ``tilt_mm_per_slice`` shifts IPP along the column direction per slice (gantry tilt); ``omit`` lists tags
    (keywords) to leave out; ``per_slice_slope`` gives every slice a different RescaleSlope.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    K, J, I = hu.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    iop = np.array(iop, dtype=float)
    n = np.cross(iop[:3], iop[3:])
    pos = np.arange(K) * spacing[0] if positions is None else np.asarray(positions, float)
    names = [f"{prefix}{i:04d}.dcm" for i in range(K)]
    if shuffle_names:
        names = list(np.array(names)[rng.permutation(K)])
    paths = []
    for k in range(K):
        sl = slope * (1.0 + 0.01 * k) if per_slice_slope else slope
        stored = np.round((hu[k] - intercept) / sl)
        lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
        stored = np.clip(stored, lo, hi).astype(np.int16 if signed else np.uint16)
        ds = _base_dataset(study_uid, series_uid, for_uid, modality)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.InstanceNumber = (K - k) if reverse_instance else (k + 1)
        ipp = np.array(origin, float) + pos[k] * n + k * tilt_mm_per_slice * iop[3:]
        ds.ImagePositionPatient = [f"{v:.6g}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in iop]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[2]:.6g}"]
        ds.SliceThickness = f"{spacing[0]:.6g}"
        ds.Rows, ds.Columns = J, I
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{sl:.8g}"
        ds.RescaleIntercept = f"{intercept:.6g}"
        ds.RescaleType = "HU"
        if tilt_mm_per_slice:
            ds.GantryDetectorTilt = f"{np.degrees(np.arctan2(tilt_mm_per_slice, spacing[0])):.3f}"
        if private_block:
            ds.add_new(0x00091010, "LO", "BMD_D2_PRIVATE")
            ds.add_new(0x00091011, "OB", bytes(range(200)))
            seq_item = Dataset()
            seq_item.CodeValue = "123"
            seq_item.CodingSchemeDesignator = "99SYN"
            ds.ProcedureCodeSequence = [seq_item]
        for kw in omit:
            if kw in ds:
                delattr(ds, kw)
        ds.PixelData = stored.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = (transfer_syntax if transfer_syntax in (ImplicitVRLittleEndian,
                                                                                  ExplicitVRLittleEndian)
                                          else ExplicitVRLittleEndian)
        if transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            ds.compress(transfer_syntax)
        path = os.path.join(folder, names[k])
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(path, hu, spacing=(2.0, 2.0, 2.0), *, origin=(-100.0, -100.0, -300.0), intercept=-1024.0):
    """Write ``hu`` (K, J, I) as one Enhanced CT multi-frame file with per-frame functional groups (frames shuffled)."""
    K, J, I = hu.shape
    rng = np.random.default_rng(1)
    order = rng.permutation(K)
    ds = _base_dataset(generate_uid(), generate_uid(), generate_uid())
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = K
    ds.Rows, ds.Columns = J, I
    ds.PixelRepresentation = 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [spacing[1], spacing[2]]
    pm.SliceThickness = spacing[0]
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [po]
    pv = Dataset()
    pv.RescaleSlope = 1
    pv.RescaleIntercept = intercept
    pv.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [pv]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for k in order:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        item.PlanePositionSequence = [pp]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    stored = np.round(hu[order] - intercept).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def make_dataset(root, n=2, seed=0):
    """A tiny dataset of the standard layout (``studies/<id>/dicom``, ``labels.nii.gz``, ``bmd.csv``).

    Uses the phantom generator when it is importable, else block phantoms written here. Returns the study ids.
    """
    try:
        from bmd_d2.phantoms import PhantomOptions, generate_dataset
    except ImportError:
        generate_dataset = None
    if generate_dataset is not None:
        return generate_dataset(str(root), n, seed=seed, options=PhantomOptions.tiny(), progress=False)
    import csv

    import nibabel as nib

    from bmd_d2.levels import LEVELS

    ids = []
    rows = []
    for s in range(n):
        sid = f"block_{s:03d}"
        hu, lab = block_phantom(shape=(60, 64, 64), spacing=(2.0, 2.0, 2.0), centre_x_mm=5.0 * s, seed=seed + s)
        d = os.path.join(str(root), "studies", sid)
        write_series(os.path.join(d, "dicom"), hu, origin=(-63.0, -63.0, -59.0), seed=seed + s)
        aff_lps = np.array([[2.0, 0, 0, -63.0], [0, 2.0, 0, -63.0], [0, 0, 2.0, -59.0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(np.transpose(lab, (2, 1, 0)).astype(np.int16), np.diag([-1, -1, 1, 1]) @ aff_lps),
                 os.path.join(d, "labels.nii.gz"))
        for v in sorted(set(np.unique(lab)) - {0}):
            rows.append({"study_id": sid, "level": LEVELS[v - 1], "bmd_mg_cm3": 100.0 + v, "trabecular_hu": 180.0})
        ids.append(sid)
    with open(os.path.join(str(root), "bmd.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["study_id", "level", "bmd_mg_cm3", "trabecular_hu"])
        w.writeheader()
        w.writerows(rows)
    return ids
