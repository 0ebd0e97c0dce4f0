"""Writing a phantom study: its CT DICOM series, NIfTI label volumes, preview PNG, truth JSON and the BMD table.

Layout of a study folder (:func:`write_study`): ``dicom/`` (one CT Image Storage file per slice), ``labels.nii.gz``
and ``cores.nii.gz`` (RAS NIfTI whose affine maps the same voxels to the same physical points as the DICOM series),
``phantom.json`` (truth, every random parameter, ``generator_version``) and ``preview.png``. A dataset's ``bmd.csv``
(:func:`write_bmd_csv`) lists ``study_id,level,bmd_mg_cm3,trabecular_hu,calibrated_hu`` of every labelled level.
"""
import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from bmd_d2.levels import LEVELS
from bmd_d2.utils.files import atomic_write_text

from .options import TRANSFER_SYNTAXES, DicomStyle, PhantomStudy

__all__ = ["CSV_FIELDS", "write_bmd_csv", "write_dicom_series", "write_preview", "write_study"]

#: ``calibrated_hu`` (the trabecular bone's HU without the cortex's partial volume; empty for old rows) is the last.
CSV_FIELDS = ("study_id", "level", "bmd_mg_cm3", "trabecular_hu", "calibrated_hu")


# ----------------------------------------------------------------------------------------------------------- DICOM
def _uid(study: PhantomStudy, *what) -> str:
    """Deterministic DICOM UID from the study seed and a purpose string."""
    from pydicom.uid import generate_uid

    rescan = study.params.get("rescan_seed")  # a re-scan is a new series (and study) of the same patient
    extra = [f"rescan-{rescan}"] if rescan is not None else []
    return generate_uid(entropy_srcs=["bmd_d2-phantom", str(study.seed), study.study_id, *extra, *map(str, what)])


def _series_template(study: PhantomStudy, style: DicomStyle, ts_uid):
    """The file meta and dataset shared by every slice of the series (slice-specific tags are set per file)."""
    from pydicom import uid as puid
    from pydicom.dataset import Dataset, FileMetaDataset

    nk, nj, ni = study.hu.shape
    p = study.params
    study_uid, series_uid, frame_uid = _uid(study, "study"), _uid(study, "series"), _uid(study, "frame")
    rng = np.random.default_rng(np.random.SeedSequence([study.seed & 0xFFFFFFFF, 77]))
    date = (np.datetime64("2001-01-01") + int(rng.integers(0, 7000))).astype(str).replace("-", "")
    time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = puid.CTImageStorage
    fm.TransferSyntaxUID = ts_uid
    fm.ImplementationClassUID = puid.PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "BMD_D2_PHANTOM"
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = puid.CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "BMD_D2 SYNTHETIC"
    ds.InstitutionName = "Synthetic Phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "SYNTHETIC LUMBAR SPINE PHANTOM"
    ds.SeriesDescription = f"Phantom {p['kernel']} {study.slice_thickness:g}mm"
    ds.ManufacturerModelName = "bmd_d2 phantom generator"
    ds.PatientName = "PHANTOM^BMD"
    ds.PatientID = f"PHANTOM-{study.study_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = p.get("patient_sex", "O")
    if "age" in p:
        ds.PatientAge = f"{int(p['age']):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "LSPINE"
    ds.SliceThickness = f"{study.slice_thickness:g}"
    if p.get("kvp_tag_written", True):
        ds.KVP = f"{p['kvp']:g}"
    if p.get("contrast") and p.get("contrast_tag_written"):
        ds.ContrastBolusAgent = "IODINATED CONTRAST"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{ni * study.spacing[2]:.2f}"
    ds.ConvolutionKernel = p["kernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = nj, ni
    ds.PixelSpacing = [f"{study.spacing[1]:g}", f"{study.spacing[2]:g}"]  # row spacing (dy), column spacing (dx)
    ds.BitsAllocated = 16
    ds.BitsStored = style.bits_stored
    ds.HighBit = style.bits_stored - 1
    ds.PixelRepresentation = 1 if style.storage == "signed" else 0
    if style.optional_tags:
        ds.SpacingBetweenSlices = f"{study.spacing[0]:g}"
        ds.WindowCenter = "350"
        ds.WindowWidth = "1000"
    if style.fov_padding:
        ds.PixelPaddingValue = int(round((-3024.0 - style.intercept) / style.slope))
    ds.RescaleIntercept = f"{style.intercept:g}"
    ds.RescaleSlope = f"{style.slope:g}"
    ds.RescaleType = "HU"
    return fm, ds


def write_dicom_series(study: PhantomStudy, out_dir, style: Optional[DicomStyle] = None) -> List[Path]:
    """Write ``study`` as a CT Image Storage series, one file per slice.

    Args:
        study: from :func:`~bmd_d2.phantoms.dataset.generate_study`.
        out_dir: folder to create (existing ``*.dcm`` files in it are removed first).
        style: encoding; defaults to ``study.style``.

    Returns:
        Paths of the written files in slice (inferior → superior) order.
    """
    from pydicom import uid as puid

    style = style or study.style
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.dcm"):
        old.unlink()
    nk = study.hu.shape[0]
    ts_uid = getattr(puid, TRANSFER_SYNTAXES[style.transfer_syntax])
    fm, ds = _series_template(study, style, ts_uid)
    order = np.arange(nk)[::-1] if style.reverse_instances else np.arange(nk)
    inst = np.empty(nk, int)
    inst[order] = np.arange(1, nk + 1)
    paths: List[Path] = []
    compressed = style.transfer_syntax not in ("explicit", "implicit")
    plugin = ""
    if compressed:  # prefer the fast native encoder (pylibjpeg-rle is ~15x faster than pydicom's own RLE)
        from pydicom.pixels import get_encoder

        plugins = get_encoder(ts_uid).available_plugins
        plugin = "pylibjpeg" if "pylibjpeg" in plugins else ""
    for k in range(nk):
        sop = _uid(study, "sop", k)
        fm.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(inst[k])
        ipp = study.affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp[:3]]
        if style.optional_tags:
            ds.SliceLocation = f"{ipp[2]:.4f}"
        arr = style.stored_values(study.hu[k])
        if compressed:
            if "PixelData" in ds:
                del ds.PixelData
            fm.TransferSyntaxUID = puid.ExplicitVRLittleEndian
            ds.compress(ts_uid, arr, encoding_plugin=plugin, generate_instance_uid=False)
        else:
            ds.PixelData = arr.tobytes()
        if style.shuffle_names:
            name = hashlib.sha1(sop.encode()).hexdigest()[:16] + ".dcm"
        else:
            name = f"IM{int(inst[k]):05d}.dcm"
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------- files
def _ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """NIfTI (RAS) affine of an LPS voxel→patient affine: negate the x and y rows."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def _save_nifti(arr_kji: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """Write a ``(K, J, I)`` volume as RAS NIfTI indexed ``(i, j, k)`` (qform = sform = the RAS affine, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr_kji).transpose(2, 1, 0), _ras_affine(affine_lps))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_preview(study: PhantomStudy, path) -> None:
    """Mid-sagittal slice (square mm pixels, superior up, anterior left) with label overlay, plus the L3 axial."""
    from PIL import Image, ImageDraw

    dk, dj, di = study.spacing
    c = study.params["spine_centers_lps"]["L3"]
    inv = np.linalg.inv(study.affine)
    i_mid = int(round((inv @ np.array([c[0], c[1], c[2], 1.0]))[0]))
    i_mid = int(np.clip(i_mid, 0, study.hu.shape[2] - 1))
    k_l3 = int(np.clip(round((inv @ np.array([c[0], c[1], c[2], 1.0]))[2]), 0, study.hu.shape[0] - 1))

    def window(a):
        return (np.clip((a - (350 - 500)) / 1000.0, 0, 1) * 255).astype(np.uint8)

    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.float32)

    def overlay(gray, lab):
        rgb = np.repeat(gray[..., None].astype(np.float32), 3, -1)
        m = lab > 0
        rgb[m] = 0.6 * rgb[m] + 0.4 * palette[lab[m]]
        return rgb.astype(np.uint8)

    sag = study.hu[::-1, :, i_mid]  # (K, J) superior at top, anterior (small y) left
    lab = study.labels[::-1, :, i_mid]
    scale = min(dk, dj)
    size = (max(1, int(round(sag.shape[1] * dj / scale))), max(1, int(round(sag.shape[0] * dk / scale))))
    fit = min(1.0, 700.0 / max(size))
    size = (max(1, int(size[0] * fit)), max(1, int(size[1] * fit)))
    im_s = Image.fromarray(overlay(window(sag), lab)).resize(size, Image.NEAREST)
    ax = overlay(window(study.hu[k_l3]), study.labels[k_l3])
    ah = size[1]
    aw = max(1, int(ax.shape[1] * ah / ax.shape[0]))
    im_a = Image.fromarray(ax).resize((aw, ah), Image.BILINEAR)
    canvas = Image.new("RGB", (size[0] + aw + 4, ah), (0, 0, 0))
    canvas.paste(im_s, (0, 0))
    canvas.paste(im_a, (size[0] + 4, 0))
    draw = ImageDraw.Draw(canvas)
    for t in study.truth:
        rows, cols = np.nonzero(lab == t["label"])
        if rows.size:
            y = rows.mean() * size[1] / sag.shape[0]
            x = cols.max() * size[0] / sag.shape[1]
            draw.text((min(x + 4, size[0] - 90), y - 5), f"{t['level']} {t['bmd_mg_cm3']:.0f}", fill=(255, 255, 255))
    draw.text((4, 4), f"{study.study_id} {study.slice_thickness:g}mm", fill=(255, 255, 0))
    canvas.save(str(path), optimize=False)


def write_study(study: PhantomStudy, study_dir, preview: bool = True) -> Path:
    """Write ``dicom/``, ``labels.nii.gz``, ``cores.nii.gz``, ``phantom.json`` and ``preview.png`` into study_dir."""
    d = Path(study_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_dicom_series(study, d / "dicom")
    _save_nifti(study.labels, study.affine, d / "labels.nii.gz")
    _save_nifti(study.cores, study.affine, d / "cores.nii.gz")
    rec = dict(study_id=study.study_id, truth=study.truth, params=study.params,
               generator_version=study.generator_version, affine_lps=study.affine.tolist(),
               shape_kji=list(study.hu.shape))
    (d / "phantom.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    if preview:
        write_preview(study, d / "preview.png")
    return d


_HU_FIELDS = ("bmd_mg_cm3", "trabecular_hu", "calibrated_hu")


def write_bmd_csv(path, rows: Sequence[Dict], replace_studies: Optional[Sequence[str]] = None) -> None:
    """Write ``bmd.csv`` (``study_id,level,bmd_mg_cm3,trabecular_hu,calibrated_hu``), keeping rows of other studies
    already there (rows of a file without ``calibrated_hu`` keep it empty).

    Args:
        path: CSV path.
        rows: dicts with the :data:`CSV_FIELDS` (``calibrated_hu`` may be missing or None).
        replace_studies: study ids whose old rows are dropped (default: the ids in ``rows``).
    """
    path = Path(path)
    drop = set(replace_studies if replace_studies is not None else (r["study_id"] for r in rows))
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r.get("study_id") not in drop]
    allrows = old + [{k: r.get(k) for k in CSV_FIELDS} for r in rows]
    order = {name: i for i, name in enumerate(LEVELS)}
    allrows.sort(key=lambda r: (r["study_id"], order.get(r["level"], 99)))
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    wr.writeheader()
    for r in allrows:
        wr.writerow({k: ("" if r.get(k) in (None, "") else f"{float(r[k]):.3f}" if k in _HU_FIELDS else r[k])
                     for k in CSV_FIELDS})
    atomic_write_text(str(path), buf.getvalue())
