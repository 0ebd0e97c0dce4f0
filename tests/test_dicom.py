"""DICOM/NIfTI ingestion: variants, geometry checks and one-line errors on tiny pydicom-written series."""
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from _dicom_fixtures import block_phantom, write_multiframe, write_series
from bmd_d2.data.dicom import list_series, load_nifti, load_series, load_volume
from bmd_d2.data.dicom.reader import _fast_header
from bmd_d2.errors import BMDError

REAL = os.path.join(os.path.dirname(__file__), "data", "real", "totalseg_example_ct_dicom")


@pytest.fixture(scope="module")
def hu():
    return block_phantom(shape=(12, 32, 40), spacing=(2.0, 2.0, 2.0))[0]


def _one_line(ex):
    s = str(ex.value)
    assert "\n" not in s and s
    return s


def test_basic_sorting_and_hu(tmp_path, hu):
    paths = write_series(tmp_path / "s", hu)  # shuffled names, reversed InstanceNumber
    v = load_series(tmp_path / "s")
    assert v.data.dtype == np.float32 and v.data.shape == hu.shape
    np.testing.assert_allclose(v.data, hu, atol=0.51)
    assert v.spacing == pytest.approx((2.0, 2.0, 2.0))
    np.testing.assert_allclose(v.affine[:3, 3], [-100, -100, -300])
    assert v.warnings == []
    # identifiers: per-slice SOPInstanceUIDs in slice order
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert v.meta["SOPInstanceUIDs"] == uids
    assert v.meta["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2" and v.meta["StudyInstanceUID"]
    assert v.meta["FrameOfReferenceUID"] and v.meta["SeriesInstanceUID"]


def test_matches_pydicom(tmp_path, hu):
    paths = write_series(tmp_path / "s", hu, signed=False, intercept=-1024.0, slope=0.5, bits_stored=12,
                         transfer_syntax=pydicom.uid.ExplicitVRLittleEndian)
    v = load_series(paths[::-1])  # list of files, any order
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(v.data[k], ref, atol=1e-3)


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"])
def test_compressed(tmp_path, hu, ts):
    write_series(tmp_path / "s", hu[:3], transfer_syntax=ts)
    v = load_series(tmp_path / "s")
    np.testing.assert_allclose(v.data, hu[:3], atol=0.51)


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
@pytest.mark.parametrize("signed,bits", [(True, 16), (True, 12), (False, 12)])
def test_fast_decode_equals_pydicom(tmp_path, hu, signed, bits, ts, monkeypatch):
    import bmd_d2.data.dicom.reader as D

    monkeypatch.setattr(D, "_FAST_CHECKED", {})
    calls = []
    fast = D._fast_decode
    monkeypatch.setattr(D, "_fast_decode", lambda h: calls.append(h["_path"]) or fast(h))
    paths = write_series(tmp_path / "s", hu[:4], signed=signed, bits_stored=bits, intercept=-1024.0 if signed else
                         -2048.0, transfer_syntax=ts)
    v = load_series(tmp_path / "s", workers=1)
    # imagecodecs checked once against pydicom on the first slice, then used for every slice
    assert list(D._FAST_CHECKED.values()) == [True] and len(calls) == 4
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert np.array_equal(v.data[k], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    # a direct decode that disagrees with pydicom on the first slice is never used for that folder and format
    monkeypatch.setattr(D, "_FAST_CHECKED", {})
    monkeypatch.setattr(D, "_fast_decode",
                        lambda h: np.zeros((h["Rows"], h["Columns"]), np.int16) + 7)
    v2 = load_series(tmp_path / "s", workers=1)
    assert list(D._FAST_CHECKED.values()) == [False] and np.array_equal(v2.data, v.data)


def test_per_slice_rescale_signed_12bit(tmp_path, hu):
    write_series(tmp_path / "s", hu, per_slice_slope=True, bits_stored=12, intercept=0.0)
    v = load_series(tmp_path / "s")
    np.testing.assert_allclose(v.data, hu, atol=0.6)


def test_multiframe(tmp_path, hu):
    p = write_multiframe(tmp_path / "mf.dcm", hu)
    v = load_series(p)
    np.testing.assert_allclose(v.data, hu, atol=0.51)
    assert v.spacing == pytest.approx((2.0, 2.0, 2.0))


def test_missing_optional_tags(tmp_path, hu):
    write_series(tmp_path / "s", hu, omit=("SliceThickness", "KVP", "Manufacturer", "SeriesDescription"))
    v = load_series(tmp_path / "s")
    assert v.meta["KVP"] is None and v.data.shape == hu.shape


def test_missing_rescale_warns(tmp_path, hu):
    write_series(tmp_path / "s", hu, omit=("RescaleSlope", "RescaleIntercept"), intercept=0.0)
    v = load_series(tmp_path / "s")
    assert any("Rescale" in w for w in v.warnings)


def test_non_ct_modality(tmp_path, hu):
    write_series(tmp_path / "s", hu[:3], modality="MR")
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "s")
    assert "no CT" in _one_line(ex)


def test_several_series_rule_and_choice(tmp_path, hu):
    write_series(tmp_path / "d" / "a", hu, prefix="a")
    write_series(tmp_path / "d" / "b", hu[:5], prefix="b", series_uid="1.2.3.4.5")
    write_series(tmp_path / "d" / "loc", hu[:1], prefix="l", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    infos = list_series(tmp_path / "d")
    assert len(infos) == 3 and infos[0].num_images == len(hu)
    v = load_series(tmp_path / "d")
    assert v.data.shape[0] == len(hu)
    assert any("CT series found" in w for w in v.warnings)
    v2 = load_series(tmp_path / "d", series_uid="1.2.3.4.5")
    assert v2.data.shape[0] == 5


def test_tied_series_is_an_error(tmp_path, hu):
    write_series(tmp_path / "d" / "a", hu[:4], prefix="a")
    write_series(tmp_path / "d" / "b", hu[:4], prefix="b")
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "d")
    assert "series_uid" in _one_line(ex)


def test_mixed_matrix_error(tmp_path, hu):
    uid = "1.2.3.9"
    write_series(tmp_path / "d", hu[:3], series_uid=uid, prefix="a")
    write_series(tmp_path / "d", hu[3:6, :16], series_uid=uid, prefix="b", origin=(-100, -100, -290))
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "d")
    assert "matrix" in _one_line(ex)


def test_duplicates_dropped(tmp_path, hu):
    paths = write_series(tmp_path / "s", hu[:5])
    shutil.copy(paths[2], tmp_path / "s" / "copy.dcm")
    v = load_series(tmp_path / "s")
    assert v.data.shape[0] == 5 and any("duplicate" in w for w in v.warnings)


def test_missing_slices_resampled(tmp_path, hu):
    pos = [0, 2, 4, 8, 10, 12]  # one slice missing at 6
    write_series(tmp_path / "s", hu[:6], positions=pos)
    v = load_series(tmp_path / "s")
    assert v.data.shape[0] == 7 and v.spacing[0] == pytest.approx(2.0)
    assert any("missing" in w for w in v.warnings)
    np.testing.assert_allclose(v.data[3], (hu[2] + hu[3]) / 2, atol=0.6)


def test_gantry_tilt_kept_in_affine(tmp_path, hu):
    write_series(tmp_path / "s", hu, tilt_mm_per_slice=0.5)
    v = load_series(tmp_path / "s")
    assert any("tilt" in w for w in v.warnings)
    np.testing.assert_allclose(v.affine[:3, 2], [0, 0.5, 2.0], atol=1e-6)


def test_non_axial(tmp_path, hu):
    write_series(tmp_path / "s", hu, iop=(0, 1, 0, 0, 0, -1))  # sagittal slices
    v = load_series(tmp_path / "s")
    assert any("non-axial" in w for w in v.warnings)
    # normal = row x col = (0,1,0) x (0,0,-1) = (-1, 0, 0); slices sorted along it
    np.testing.assert_allclose(v.direction[:, 2], [-1, 0, 0], atol=1e-6)


def test_bad_files(tmp_path, hu):
    write_series(tmp_path / "s", hu[:4])
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    (tmp_path / "s" / "empty.dcm").write_bytes(b"")
    v = load_series(tmp_path / "s")
    assert v.data.shape[0] == 4 and any("skipped 2" in w for w in v.warnings)
    with pytest.raises(BMDError) as ex:
        load_series([str(tmp_path / "s" / "README.txt")])
    assert "README.txt" in _one_line(ex)


def test_truncated_pixels(tmp_path, hu):
    paths = write_series(tmp_path / "s", hu[:4], shuffle_names=False)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[:-100])
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "s")
    assert os.path.basename(paths[1]) in _one_line(ex)


def test_empty_and_missing(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(BMDError):
        load_series(tmp_path / "e")
    with pytest.raises(BMDError):
        load_series(tmp_path / "nope")


def test_nifti_ras_to_lps(tmp_path, hu):
    aff_ras = np.diag([-2.0, 2.0, 3.0, 1.0])  # LAS storage: x flipped
    aff_ras[:3, 3] = [50, -60, 10]
    arr = np.transpose(hu, (2, 1, 0))  # (i, j, k)
    nib.save(nib.Nifti1Image(arr, aff_ras), str(tmp_path / "v.nii.gz"))
    v = load_volume(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(v.data, hu, atol=1e-4)
    np.testing.assert_allclose(v.affine, np.diag([-1, -1, 1, 1]) @ aff_ras)


def test_real_jpeg2000_series_geometry_and_hu():
    v = load_series(os.path.join(REAL, "dicom"))
    assert v.data.shape == (20, 512, 512) and v.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    seg = load_nifti(os.path.join(REAL, "example_seg_dicom.nii.gz"), dtype=np.int16)
    K, J, I = v.data.shape
    kk, jj, ii = np.meshgrid(np.arange(K), np.arange(J), np.arange(I), indexing="ij")
    src = np.rint(seg.lps_to_index(v.index_to_lps(np.stack([ii, jj, kk], -1)))).astype(int)
    ok = np.all((src >= 0) & (src < np.array(seg.data.shape[::-1])), -1)
    lab = np.zeros(v.data.shape, np.int16)
    lab[ok] = seg.data[src[ok][:, 2], src[ok][:, 1], src[ok][:, 0]]
    assert float(v.data[lab == 32].mean()) == pytest.approx(267, abs=5)
    assert float(v.data[lab == 33].mean()) == pytest.approx(292, abs=5)


# ------------------------------------------------------------------------------------------ dtype="auto" (int16 HU)
def _pydicom_hu(paths):
    """Reference HU float32 (K, J, I) in slice order, the way a plain pydicom loop computes them."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        out.append((float(ds.ImagePositionPatient[2]),
                    ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
    return np.stack([hu for _, hu in sorted(out, key=lambda t: t[0])])


@pytest.mark.parametrize("kw", [
    dict(),  # signed 16-bit, intercept -1024: the range check has to look at the data
    dict(signed=False, bits_stored=12),  # unsigned 12-bit: the bit range alone proves int16 is enough
    dict(signed=True, bits_stored=12, transfer_syntax=pydicom.uid.ExplicitVRLittleEndian),
    dict(slope=2.0, intercept=-2048.0),  # integer slope other than 1
    dict(transfer_syntax="1.2.840.10008.1.2.5"),  # RLE: decoded by pydicom, then stored as int16
])
def test_auto_int16_equals_float32(tmp_path, hu, kw):
    paths = write_series(tmp_path / "s", hu, **kw)
    f32 = load_series(tmp_path / "s")
    auto = load_series(tmp_path / "s", dtype="auto")
    i16 = load_series(tmp_path / "s", dtype="int16")
    assert f32.data.dtype == np.float32 and auto.data.dtype == np.int16 and i16.data.dtype == np.int16
    assert np.array_equal(auto.data, f32.data) and np.array_equal(i16.data, f32.data)
    assert np.array_equal(auto.data, _pydicom_hu(paths))
    np.testing.assert_array_equal(auto.affine, f32.affine)
    assert auto.meta["SOPInstanceUIDs"] == f32.meta["SOPInstanceUIDs"] and auto.warnings == f32.warnings


def test_auto_single_thread_and_multiframe(tmp_path, hu):
    write_series(tmp_path / "s", hu)
    a = load_series(tmp_path / "s", dtype="auto", workers=1)
    b = load_series(tmp_path / "s", dtype="auto", workers=8)
    assert a.data.dtype == np.int16 and np.array_equal(a.data, b.data)
    p = write_multiframe(tmp_path / "mf.dcm", hu)
    m = load_series(p, dtype="auto")
    assert m.data.dtype == np.int16 and np.array_equal(m.data, load_series(p).data)


def test_auto_unsigned_16bit_wraps_exactly(tmp_path):
    """uint16 stored values above 32767 with intercept -32768: HU span the whole int16 range, computed exactly."""
    vol = np.linspace(-32768, 32767, 3 * 8 * 10).round().reshape(3, 8, 10).astype(np.float32)
    paths = write_series(tmp_path / "s", vol, signed=False, intercept=-32768.0)
    auto = load_series(tmp_path / "s", dtype="auto")
    assert auto.data.dtype == np.int16
    assert np.array_equal(auto.data, vol) and np.array_equal(auto.data, _pydicom_hu(paths))


def test_auto_falls_back_to_float32(tmp_path, hu):
    # non-integer slope
    write_series(tmp_path / "a", hu[:4], slope=0.5)
    v = load_series(tmp_path / "a", dtype="auto")
    assert v.data.dtype == np.float32 and np.array_equal(v.data, load_series(tmp_path / "a").data)
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "a", dtype="int16")
    assert "int16" in _one_line(ex) and "RescaleSlope" in str(ex.value)
    # one slice with a different, non-integer slope
    write_series(tmp_path / "b", hu[:4], per_slice_slope=True)
    assert load_series(tmp_path / "b", dtype="auto").data.dtype == np.float32
    # HU below -32768 (stored -32000, intercept -1024): found while reading, the whole volume is redone as float32
    low = hu[:3].copy()
    low[1, 0, :4] = -33024.0
    write_series(tmp_path / "c", low)
    v = load_series(tmp_path / "c", dtype="auto")
    assert v.data.dtype == np.float32 and v.data[1, 0, 0] == -33024.0
    assert np.array_equal(v.data, load_series(tmp_path / "c").data)
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "c", dtype="int16")
    assert "outside" in _one_line(ex)
    # resampled slices are not integers
    write_series(tmp_path / "d", hu[:6], positions=[0, 2, 4, 8, 10, 12])
    v = load_series(tmp_path / "d", dtype="auto")
    assert v.data.dtype == np.float32 and v.data.shape[0] == 7
    with pytest.raises(BMDError) as ex:
        load_series(tmp_path / "d", dtype="int16")
    assert "resampled" in _one_line(ex)
    with pytest.raises(ValueError):
        load_series(tmp_path / "a", dtype=np.float64)


def test_auto_nifti(tmp_path, hu):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)).round().astype(np.int16), aff), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)) + np.float32(0.25), aff), str(tmp_path / "f.nii.gz"))
    vi = load_volume(tmp_path / "i.nii.gz", dtype="auto")
    assert vi.data.dtype == np.int16 and np.array_equal(vi.data, load_volume(tmp_path / "i.nii.gz").data)
    vf = load_volume(tmp_path / "f.nii.gz", dtype="auto")
    assert vf.data.dtype == np.float32 and np.array_equal(vf.data, hu + np.float32(0.25))


def test_header_beyond_first_read(tmp_path, hu):
    """Headers longer than the first read (a 40 KiB private value) and of changing size are parsed exactly."""
    paths = write_series(tmp_path / "s", hu[:4], transfer_syntax=pydicom.uid.ExplicitVRLittleEndian)
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.add_new(0x00291010, "OB", bytes(40000 if i % 2 else 70000))
        ds.add_new(0x00291020, "UN", bytes(range(256)) * 8)
        ds.save_as(p)
    for p in paths:  # the fast walker (not the pydicom fallback) finds the pixel data at the end of the file
        h = _fast_header(p)
        assert h["_pixel_offset"] == os.path.getsize(p) - hu[0].size * 2 and h["Rows"] == hu.shape[1]
    v = load_series(tmp_path / "s", dtype="auto")
    assert v.data.dtype == np.int16 and np.array_equal(v.data, _pydicom_hu(paths))
    assert v.meta["SOPInstanceUIDs"] == [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
