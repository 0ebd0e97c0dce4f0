"""Real-world header corpus for the DICOM loader (issue 16, point 4, loader half).

1. Every attribute the loader reads (``bmd_d2.data.dicom.reader.TAGS``, plus Pixel Data), removed and emptied in turn in
   every file of a series derived from a phantom and from the real series (tests/data/real): each variant loads with
   the unmodified series' geometry (and HU, or a stated HU rule plus a warning naming the attribute where a default was
   assumed), or fails with a one-line ``BMDError`` that names a file of the series and the attribute.
2. Every file bundled with pydicom (``pydicom.data``: DICOM of every kind, broken and odd ones, text, JSON, ...) as its
   own study in one batch through ``run_batch`` with the quick model: each ends "ok" or "failed" with a ``BMDError``'s
   message, never with another exception's.
"""
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import ImplicitVRLittleEndian

from bmd_d2 import BMDError
from bmd_d2.data.dicom import reader as dicom_mod
from bmd_d2.data.dicom import load_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct_dicom", "dicom")
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
SOURCES = ("phantom", "real")
MODES = ("removed", "emptied")
N_PHANTOM, N_REAL = 8, 3  # contiguous slices kept from each source (fast variants, the headers stay as written)
_META = ("TransferSyntaxUID", "MediaStorageSOPClassUID")

# Every attribute the loader reads: the fast walker's tags (the pydicom fallback, _dataset_header, reads the same
# keywords) and Pixel Data (offset/length in the walker, presence in the fallback, decoded by pydicom).
ATTRIBUTES = [kw for kw, _ in dicom_mod.TAGS.values()] + ["PixelData"]

# Expected outcome per attribute, the same for both sources and both modes:
#   ("same",)          loads; shape, affine and HU equal the unmodified series'; no new warning
#   ("warn", hu_rule)  loads; shape and affine equal; a new warning names the attribute; HU follow ``hu_rule``
#                      ("same": equal; "no_intercept": HU - intercept; "no_slope": (HU - intercept) / slope + intercept)
#   ("error",)         one-line BMDError naming a file of the series and the attribute
SAME, ERROR = ("same",), ("error",)
EXPECT = {
    "TransferSyntaxUID": ERROR,  # Type 1 file meta: without it the pixel data cannot be decoded safely
    "MediaStorageSOPClassUID": SAME,
    "SpecificCharacterSet": SAME,  # read only so that a damaged one is refused as pydicom refuses it
    "ImageType": SAME,
    "SOPClassUID": SAME,
    "SOPInstanceUID": SAME,
    "Modality": ("warn", "same"),  # CT assumed from the (Media Storage) SOP Class UID, with a warning
    "Manufacturer": SAME,
    "SeriesDescription": SAME,
    "SliceThickness": SAME,  # only used for a single-slice series
    "KVP": SAME,
    "GantryDetectorTilt": SAME,  # the tilt is measured from the positions
    "PatientPosition": SAME,
    "StudyInstanceUID": SAME,
    "SeriesInstanceUID": SAME,  # the files without one form one series; Volume.meta holds "" (no placeholder)
    "SeriesNumber": SAME,
    "InstanceNumber": SAME,  # never used for sorting
    "ImagePositionPatient": ERROR,
    "ImageOrientationPatient": ERROR,
    "FrameOfReferenceUID": SAME,
    "SamplesPerPixel": ("warn", "same"),  # 1 assumed
    "PhotometricInterpretation": ("warn", "same"),  # MONOCHROME2 assumed
    "NumberOfFrames": SAME,  # single-frame files
    "Rows": ERROR,
    "Columns": ERROR,
    "PixelSpacing": ERROR,
    "BitsAllocated": ERROR,  # the pixel layout is unknown without it
    "BitsStored": ("warn", "same"),  # BitsAllocated assumed (no masking); both sources keep the high bits clear
    "PixelRepresentation": ERROR,  # signed or unsigned storage unknown: a default could be silently wrong HU
    "RescaleIntercept": ("warn", "no_intercept"),  # 0 assumed
    "RescaleSlope": ("warn", "no_slope"),  # 1 assumed
    "SharedFunctionalGroupsSequence": SAME,  # not in single-frame files; an empty one changes nothing
    "PerFrameFunctionalGroupsSequence": SAME,
    "PixelData": ERROR,
}


def _slice_z(path: str) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def _copy_subset(files, n: int, dst: Path) -> None:
    """Copy ``n`` contiguous slices (by position) of ``files`` into ``dst`` under their own names."""
    dst.mkdir(parents=True)
    ordered = sorted(files, key=_slice_z)
    start = (len(ordered) - n) // 2
    for f in ordered[start:start + n]:
        shutil.copy(f, dst / os.path.basename(f))


_EMPTY_ENCAPSULATED = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table item, no fragment


def _empty_value(kw: str, ds):
    vr = dictionary_VR(tag_for_keyword(kw))
    if vr == "SQ":
        return []
    if kw == "PixelData":
        return _EMPTY_ENCAPSULATED if ds.file_meta.TransferSyntaxUID.is_compressed else b""
    return None  # written as a zero-length value


def _write_variant(base: Path, dst: Path, kw: str, mode: str) -> None:
    """Every file of ``base`` with ``kw`` removed or emptied (added empty where absent), saved into ``dst``."""
    dst.mkdir(parents=True)
    tag = tag_for_keyword(kw)
    for f in sorted(base.iterdir()):
        ds = pydicom.dcmread(str(f))
        implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        target = ds.file_meta if kw in _META else ds
        if mode == "removed":
            if kw in target:
                del target[kw]
        elif kw in target:
            target[kw].value = _empty_value(kw, ds)
        else:
            vr = dictionary_VR(tag)
            target.add_new(tag, "OB" if " or " in vr else vr, _empty_value(kw, ds))
        ds.save_as(str(dst / f.name), enforce_file_format=False, implicit_vr=implicit, little_endian=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{source: (base folder, base Volume, {(attribute, mode): variant folder})} written once for the module."""
    from bmd_d2.phantoms import PhantomOptions, generate_study, write_study

    root = tmp_path_factory.mktemp("header_corpus")
    study = generate_study(0, PhantomOptions.tiny(metal=False, fracture=False))
    sdir = write_study(study, root / "phantom_full", preview=False)
    _copy_subset([str(p) for p in (sdir / "dicom").iterdir()], N_PHANTOM, root / "phantom" / "base")
    shutil.rmtree(sdir)
    _copy_subset([os.path.join(REAL, f) for f in os.listdir(REAL)], N_REAL, root / "real" / "base")
    out = {}
    for src in SOURCES:
        base = root / src / "base"
        variants = {}
        for i, kw in enumerate(ATTRIBUTES):
            for mode in MODES:  # folder names without the keyword: a message must name it by itself
                variants[kw, mode] = root / src / f"v{i:02d}{mode[0]}"
                _write_variant(base, variants[kw, mode], kw, mode)
        out[src] = (base, load_volume(str(base)), variants)
    return out


def test_every_attribute_has_an_expectation():
    assert set(EXPECT) == set(ATTRIBUTES)
    assert len(ATTRIBUTES) == len(dicom_mod.TAGS) + 1 >= 34


def test_sources_are_what_the_corpus_assumes(corpus):
    """The phantom is signed explicit-VR raw data with intercept -1024; the real series is unsigned 12-bit JPEG 2000
    with empty UIDs. The expectations above depend on it."""
    ph = pydicom.dcmread(str(next(corpus["phantom"][0].iterdir())))
    real = pydicom.dcmread(str(next(corpus["real"][0].iterdir())))
    assert (ph.PixelRepresentation, ph.BitsStored, float(ph.RescaleIntercept)) == (1, 16, -1024.0)
    assert ph.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (real.PixelRepresentation, real.BitsStored, real.BitsAllocated) == (0, 12, 16)
    assert real.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert real.SeriesInstanceUID == "" and real.SOPClassUID == "" and real.StudyInstanceUID == ""
    for src, n in (("phantom", N_PHANTOM), ("real", N_REAL)):
        vol = corpus[src][1]
        assert vol.shape[0] == n and np.isfinite(vol.data).all()
    # no placeholder posing as a UID: the real series' empty SeriesInstanceUID stays empty
    assert corpus["phantom"][1].meta["SeriesInstanceUID"] == ph.SeriesInstanceUID
    assert corpus["real"][1].meta["SeriesInstanceUID"] == ""
    assert not corpus["phantom"][1].warnings and not corpus["real"][1].warnings


def _expected_hu(rule: str, base_vol, base_file: str) -> np.ndarray:
    ds = pydicom.dcmread(base_file, stop_before_pixels=True)
    slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if rule == "no_intercept":
        return base_vol.data - np.float32(inter)
    if rule == "no_slope":
        return (base_vol.data - np.float32(inter)) / np.float32(slope) + np.float32(inter)
    return base_vol.data


CASES = [(s, kw, m) for s in SOURCES for kw in ATTRIBUTES for m in MODES]


@pytest.mark.parametrize("source,kw,mode", CASES, ids=[f"{s}-{kw}-{m}" for s, kw, m in CASES])
def test_attribute_variant(corpus, source, kw, mode):
    base, base_vol, variants = corpus[source]
    folder = variants[kw, mode]
    names = sorted(os.listdir(folder))
    expect = EXPECT[kw]
    if expect[0] == "error":
        with pytest.raises(BMDError) as e:
            load_volume(str(folder))
        msg = str(e.value)
        assert "\n" not in msg and "Traceback" not in msg, msg
        assert kw in msg.replace(str(folder), ""), msg  # names the attribute
        assert any(n in msg for n in names), msg  # names a file of the series
        return
    vol = load_volume(str(folder))
    assert vol.shape == base_vol.shape
    np.testing.assert_array_equal(vol.affine, base_vol.affine)
    new = [w for w in vol.warnings if w not in base_vol.warnings]
    assert all("\n" not in w for w in vol.warnings)
    if kw in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality"):
        assert vol.meta[kw] == ("CT" if kw == "Modality" else ""), vol.meta[kw]
    if expect[0] == "same":
        assert not new, new
        np.testing.assert_array_equal(vol.data, base_vol.data)
        return
    assert any(kw in w for w in new), (new, vol.warnings)
    want = _expected_hu(expect[1], base_vol, str(next(base.iterdir())))
    np.testing.assert_allclose(vol.data, want, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# pydicom's bundled data, one study per file, one batch
# ----------------------------------------------------------------------------------------------------------------------
def _pydicom_data_files():
    """Every file bundled in the pydicom package's data folders (found locally: ``get_testdata_files`` would also try
    to download pydicom-data's files, and nothing is downloaded at test time)."""
    import pydicom.data

    root = Path(pydicom.data.DATA_ROOT)
    files = [p for sub in ("test_files", "charset_files", "palettes") for p in sorted((root / sub).rglob("*"))
             if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    return root, files


def test_pydicom_bundled_files_in_one_batch(tmp_path, caplog):
    import torch

    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.engine.batch import run_batch
    from bmd_d2.measure.predictor import BMDStudyPredictor

    root, files = _pydicom_data_files()
    assert len(files) >= 150
    cfg = get_bmd_cfg(QUICK)
    # as the CLI test in test_dicom_outputs.py; at most 4 detections keep random weights' mask heads quick
    cfg.merge_from_list(["INPUT.DICOM.IMAGE_SIZE", "256", "INPUT.DICOM.CACHE_DIR", "",
                         "TEST.DETECTIONS_PER_IMAGE", "4"])
    torch.manual_seed(0)
    predictor = BMDStudyPredictor(cfg)
    raised = {}
    loaded = {}

    def measure(src, sid):
        try:
            vol = load_volume(src, dtype="auto")
            loaded[sid] = vol.shape
            return predictor(vol, study_id=sid)
        except Exception as ex:
            raised[sid] = ex
            raise

    studies = [(f"f{i:03d}", str(p)) for i, p in enumerate(files)]
    with caplog.at_level(logging.ERROR, logger="bmd_d2.engine.batch"):
        summary = run_batch(measure, studies, str(tmp_path / "out"), overlay=False, progress=False)
    by_id = {o.study_id: o for o in summary.outcomes}
    assert sorted(by_id) == [sid for sid, _ in studies]
    unexpected = {sid: f"{type(ex).__name__}: {ex}" for sid, ex in raised.items() if not isinstance(ex, BMDError)}
    assert not unexpected, unexpected
    for sid, src in studies:
        o = by_id[sid]
        assert o.status in ("ok", "failed"), (src, o.status)
        if o.status == "ok":
            assert sid in loaded and sid not in raised
            assert (tmp_path / "out" / sid / "result.json").is_file()
            continue
        assert sid in raised, (src, o.reason)
        assert o.reason == str(raised[sid]) and "\n" not in o.reason, (src, o.reason)
        assert src in o.reason, (src, o.reason)  # names the file
        if os.path.basename(src).startswith("DICOMDIR"):
            assert "is a DICOMDIR" in o.reason, o.reason
    ok = [sid for sid in by_id if by_id[sid].status == "ok"]
    # the bundled CT images (CT_small, the two JPEG 2000 CTs, the DICOMDIR test tree's CT slices) are measured
    assert len(ok) >= 12, ok
    assert all(len(loaded[sid]) == 3 for sid in ok)
