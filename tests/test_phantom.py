"""Phantom generator: DICOM round trip, ground truth consistency, determinism, level order, encodings, CLI."""
import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

import bmd_d2.phantoms as ph
from bmd_d2.levels import LEVEL_TO_LABEL, LEVELS
from bmd_d2.phantoms import anatomy as ph_anatomy

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def read_series(folder):
    """Read a written series with plain pydicom: (HU (K, J, I) sorted by IPP z, LPS affine, datasets in that order)."""
    dss = [pydicom.dcmread(f) for f in sorted(Path(folder).glob("*.dcm"))]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    ipp0 = np.array([float(v) for v in dss[0].ImagePositionPatient])
    dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
    dy, dx = (float(v) for v in dss[0].PixelSpacing)
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = dx, dy, dz
    aff[:3, 3] = ipp0
    return hu, aff, dss


def read_nifti_lps(path):
    """A NIfTI label volume as (K, J, I) uint8 plus its affine converted RAS → LPS."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    ids = ph.generate_dataset(root, 2, seed=11, options=ph.PhantomOptions.tiny(), progress=False)
    return root, ids


def test_dicom_roundtrip_tags_uids_geometry(tiny_dataset):
    root, ids = tiny_dataset
    st = ph.generate_study(ph.study_seed(11, 0), ph.PhantomOptions.tiny(), ids[0])
    hu, aff, dss = read_series(root / "studies" / ids[0] / "dicom")
    assert hu.shape == st.hu.shape
    np.testing.assert_allclose(aff, st.affine, atol=1e-3)
    sops = [d.SOPInstanceUID for d in dss]
    assert len(set(sops)) == len(sops)
    for d in dss:
        assert d.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE == d.SOPClassUID
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.Modality == "CT" and str(d.PatientName) == "PHANTOM^BMD"
        assert d.StudyInstanceUID == dss[0].StudyInstanceUID and d.SeriesInstanceUID == dss[0].SeriesInstanceUID
        assert d.FrameOfReferenceUID == dss[0].FrameOfReferenceUID
        for u in (d.SOPInstanceUID, d.StudyInstanceUID, d.SeriesInstanceUID):
            assert UID(u).is_valid
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(d.SliceThickness) == 3.0
        assert float(d.KVP) == st.params["kvp"] if st.params.get("kvp_tag_written", True) else "KVP" not in d
        assert (d.Rows, d.Columns) == (96, 96)
    assert dss[0].StudyInstanceUID != dss[0].SeriesInstanceUID
    np.testing.assert_allclose(hu, st.quantized_hu(), atol=1e-3)
    # the other study has other UIDs
    other = pydicom.dcmread(next((root / "studies" / ids[1] / "dicom").glob("*.dcm")), stop_before_pixels=True)
    assert other.StudyInstanceUID != dss[0].StudyInstanceUID


def test_core_hu_in_dicom_matches_csv(tiny_dataset):
    root, ids = tiny_dataset
    with open(root / "bmd.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ph.CSV_FIELDS)
    assert {r["study_id"] for r in rows} == set(ids)
    checked = 0
    for sid in ids:
        d = root / "studies" / sid
        hu, aff, _ = read_series(d / "dicom")
        cores, caff = read_nifti_lps(d / "cores.nii.gz")
        labels, laff = read_nifti_lps(d / "labels.nii.gz")
        np.testing.assert_allclose(caff, aff, atol=1e-3)
        np.testing.assert_allclose(laff, aff, atol=1e-3)
        noise = ph.generate_study(ph.study_seed(11, ids.index(sid)), ph.PhantomOptions.tiny()).params["noise_sd"]
        for r in (r for r in rows if r["study_id"] == sid):
            m = cores == LEVEL_TO_LABEL[r["level"]]
            n = int(m.sum())
            assert n > 100
            assert np.all(labels[m] == LEVEL_TO_LABEL[r["level"]])  # cores lie inside their body
            # correlated noise: ~10 voxels per independent sample at 2 mm; 5 standard errors + quantisation
            tol = 5 * noise / np.sqrt(n / 10.0) + 0.5
            assert abs(hu[m].mean() - float(r["trabecular_hu"])) < tol, (sid, r)
            assert 20.0 <= float(r["bmd_mg_cm3"]) <= 300.0
            checked += 1
    assert checked >= 8


def test_truth_definition_without_noise_or_blur():
    """With no noise and no PSF, the mean core HU equals a + b·BMD: the mean density in the core is the BMD (v4's
    one calibration line; v5's physics equivalent is in test_phantom_v5.py)."""
    st = ph.generate_study(4, ph.PhantomOptions.tiny(noise_sd=0.0, psf_sigma_mm=0.0, pixel_spacing=1.0, matrix=128,
                                                     generator_version=4))
    assert len(st.truth) >= 6
    a, b = st.params["calib_a"], st.params["calib_b"]
    for t in st.truth:
        assert abs(t["trabecular_hu"] - (a + b * t["bmd_mg_cm3"])) < 2.0, t
        assert t["calibrated_hu"] == pytest.approx(a + b * t["bmd_mg_cm3"], abs=1e-2)
    # the texture is real: the core is not flat
    m = st.cores == st.truth[0]["label"]
    assert st.hu[m].std() > 3.0


def test_posterior_elements_are_rings_and_change_nothing_else(monkeypatch):
    """Generator v4 paints laminae / spinous processes as a cortical shell around a cancellous core (real CT shows
    them as small rings, which a model must not take for vertebral bodies). Against the same seed rendered solid
    (v1-v3), only posterior-element voxels change: brighter shell, darker core; labels, cores and truth are equal."""
    opts = ph.PhantomOptions.tiny(noise_sd=0.0, psf_sigma_mm=0.0, pixel_spacing=1.0, matrix=128, generator_version=4)
    ring = ph.generate_study(4, opts)
    draw = ph_anatomy.draw_params

    def solid(rng, o):
        p = draw(rng, o)
        del p["posterior_cortex_mm"], p["posterior_core_factor"]
        return p

    monkeypatch.setattr(ph_anatomy, "draw_params", solid)
    old = ph.generate_study(4, opts)
    assert np.array_equal(ring.labels, old.labels) and np.array_equal(ring.cores, old.cores)
    assert [t["trabecular_hu"] for t in ring.truth] == [t["trabecular_hu"] for t in old.truth]
    diff = ring.hu - old.hu
    changed = np.abs(diff) > 1.0
    # outside the trabecular cores only; inside a body label only where a pedicle meets the body's edge
    assert changed.sum() > 2000 and not (changed & (ring.cores > 0)).any()
    assert (changed & (ring.labels > 0)).sum() < 0.05 * changed.sum()
    assert (diff > 100).sum() > 2000 and (diff < -50).sum() > 5000  # bright shell, darker cancellous core


def test_coarse_in_plane_study_keeps_field_of_view_and_truth():
    """Seed 13 draws a coarse reconstruction (2.73 mm pixels): a 101² matrix over the same field of view, every
    level still labelled, bodies of the drawn size, truth HU = the calibrated HU (v4: a + b·BMD) without noise/blur."""
    st = ph.generate_study(13, ph.PhantomOptions(noise_sd=0.0, psf_sigma_mm=0.0, max_slices=200))
    ps = st.params["pixel_spacing"]
    assert ps == pytest.approx(2.7261) and st.hu.shape[1:] == (101, 101) and st.params["matrix"] == 101
    assert st.affine[0, 0] == pytest.approx(ps) and st.affine[1, 1] == pytest.approx(ps)
    assert 256 <= 101 * ps <= 502  # the field of view of the 512² draw (0.5-0.98 mm pixels) is kept
    assert [t["level"] for t in st.truth][-3:] == ["L4", "L5", "S1"]
    for t in st.truth:
        assert abs(t["trabecular_hu"] - t["calibrated_hu"]) < 2.0, t
        assert t["body_voxels"] > t["core_voxels"] > 0
        # the body label spans the drawn width (voxel count across x at 2.7 mm, within two voxels)
        m = st.labels == t["label"]
        k = int(np.argmax(m.sum((1, 2))))
        width = np.ptp(np.nonzero(m[k].any(0))[0]) + 1
        assert abs(width * ps - t["width_mm"]) <= 2 * ps + 1.0, (t["level"], width * ps, t["width_mm"])


def test_determinism_same_seed_same_bytes(tmp_path):
    opts = ph.PhantomOptions.tiny(transfer_syntax=None, shuffle_names=None, storage=None, rescale=None,
                                  bits_stored=None, reverse_instances=None, fov_padding=None)
    a = ph.generate_study(123, opts, "s")
    b = ph.generate_study(123, opts, "s")
    c = ph.generate_study(124, opts, "s")
    for name in ("hu", "labels", "cores", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.truth == b.truth and a.params == b.params
    assert not np.array_equal(a.hu, c.hu) or a.hu.shape != c.hu.shape
    ph.write_study(a, tmp_path / "a")
    ph.write_study(b, tmp_path / "b")

    def digest(d):
        return {p.relative_to(d).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da == db and len(da) > 20
    # dataset seeds: per-study seeds are distinct and stable
    assert ph.study_seed(0, 1) == ph.study_seed(0, 1) != ph.study_seed(0, 2) != ph.study_seed(1, 2)


def test_labels_follow_level_order():
    st = ph.generate_study(7, ph.PhantomOptions.tiny())
    present = [t["level"] for t in st.truth]
    assert present == [lv for lv in LEVELS if lv in present]  # cranial → caudal
    assert {"L1", "L2", "L3", "L4", "L5", "S1"} <= set(present)
    assert set(np.unique(st.labels)) == {0} | {LEVEL_TO_LABEL[lv] for lv in present}
    # patient z (LPS: + superior) of each body centroid decreases with the label value
    zs = []
    for lv in present:
        k = np.nonzero(st.labels == LEVEL_TO_LABEL[lv])[0]
        zs.append(st.affine[2, 2] * k.mean() + st.affine[2, 3])
    assert all(z0 > z1 for z0, z1 in zip(zs, zs[1:]))
    # body sizes grow caudally on average (L1 < L4 in volume), with realistic dimensions
    vol = {t["level"]: t["body_voxels"] for t in st.truth}
    assert vol["L1"] < vol["L4"]
    l3 = next(t for t in st.truth if t["level"] == "L3")
    assert 22 < l3["height_mm"] < 34 and 30 < l3["depth_mm"] < 46 and 38 < l3["width_mm"] < 56


@pytest.mark.parametrize("storage,rescale,bits,ts", [
    ("signed", (1.0, -1024.0), 16, "explicit"),
    ("signed", (1.0, 0.0), 16, "implicit"),
    ("unsigned", (1.0, -1024.0), 12, "explicit"),
    ("signed", (0.5, -1024.0), 16, "explicit"),
    ("signed", (2.0, -2048.0), 16, "explicit"),
    ("signed", (1.0, -1024.0), 16, "rle"),
    ("unsigned", (1.0, -1024.0), 16, "jpegls"),
    ("signed", (1.0, -1024.0), 16, "j2k"),
])
def test_dicom_variations_decode_to_same_hu(tmp_path, storage, rescale, bits, ts):
    st = ph.generate_study(21, ph.PhantomOptions.tiny(matrix=64, metal=False))
    style = ph.DicomStyle(storage=storage, slope=rescale[0], intercept=rescale[1], bits_stored=bits,
                          transfer_syntax=ts, shuffle_names=True, reverse_instances=True)
    ph.write_dicom_series(st, tmp_path, style=style)
    hu, aff, dss = read_series(tmp_path)
    np.testing.assert_allclose(aff, st.affine, atol=1e-3)
    np.testing.assert_allclose(hu, np.clip(st.hu, *style.hu_range), atol=rescale[0] / 2 + 1e-3)  # 12 bits saturate
    assert dss[0].file_meta.TransferSyntaxUID == getattr(pydicom.uid, ph.TRANSFER_SYNTAXES[ts])
    assert dss[0].PixelRepresentation == (1 if storage == "signed" else 0) and dss[0].BitsStored == bits
    assert [int(d.InstanceNumber) for d in dss] == list(range(len(dss), 0, -1))  # reversed: 1 at the top
    assert not all(p.name.startswith("IM") for p in tmp_path.glob("*.dcm"))


def test_fov_padding_and_metal():
    st = ph.generate_study(5, ph.PhantomOptions.tiny(matrix=64, fov_padding=True, metal=True, noise_sd=0.0))
    assert st.hu[0, 0, 0] == -3024.0 and st.hu[0, 32, 32] > -1100
    assert st.hu.max() > 2500  # screws
    for t in st.truth:
        m = st.cores == t["label"]
        assert st.hu[m].max() < 1500  # cores exclude metal
    assert any(t["metal"] for t in st.truth)


def test_fracture_flagged_and_lower_anterior_height():
    st = ph.generate_study(8, ph.PhantomOptions.tiny(fracture=True, metal=False))
    fl = st.params["fracture_level"]
    t = {t["level"]: t for t in st.truth}
    assert fl in t and t[fl]["fractured"]
    assert sum(x["fractured"] for x in st.truth) == 1
    # a wedge-collapsed body has fewer voxels than its neighbours
    i = LEVELS.index(fl)
    nb = [t[lv]["body_voxels"] for lv in LEVELS[max(i - 1, 0):i + 2] if lv in t and lv != fl]
    assert t[fl]["body_voxels"] < 0.95 * np.mean(nb)


def test_parameter_ranges_cover_acr_categories():
    import numpy.random as npr

    draws = [ph_anatomy.draw_params(npr.default_rng(s), ph.PhantomOptions(generator_version=4)) for s in range(300)]
    bmd = np.array([d["bmd_mg_cm3"] for d in draws])
    assert bmd.min() >= 30 and bmd.max() <= 250
    assert (bmd < 80).mean() > 0.2 and ((bmd >= 80) & (bmd <= 120)).mean() > 0.2 and (bmd > 120).mean() > 0.2
    assert all(0.8 <= d["calib_b"] <= 1.25 and -10 <= d["calib_a"] <= 30 for d in draws)
    assert all(0.625 <= d["slice_thickness"] <= 3 for d in draws)
    fine = [d for d in draws if d["pixel_spacing"] <= 0.98]
    coarse = [d for d in draws if d["pixel_spacing"] > 0.98]
    assert all(0.5 <= d["pixel_spacing"] and d["matrix"] == 512 for d in fine)
    # coarse in-plane reconstructions (real CT down to 3 mm pixels): smaller matrix, field of view kept (<= 502 mm)
    assert 0.08 < len(coarse) / len(draws) < 0.25
    assert all(1.5 <= d["pixel_spacing"] <= 3.0 and d["matrix"] < 512 for d in coarse)
    assert all(250 <= d["matrix"] * d["pixel_spacing"] <= 503 for d in coarse)
    # a fixed pixel spacing (tests, tiny studies) switches the coarse share off
    fixed = [ph_anatomy.draw_params(npr.default_rng(s), ph.PhantomOptions(pixel_spacing=0.7, generator_version=4))
             for s in range(60)]
    assert all(d["pixel_spacing"] == 0.7 and d["matrix"] == 512 for d in fixed)
    assert all(0.5 <= d["cortex_mm"] <= 1.5 and 1.0 <= d["endplate_mm"] <= 2.0 for d in draws)
    assert all(0.4 <= d["endplate_density_factor"] <= 0.8 and 0.95 <= d["depth_factor"] <= 1.2 for d in draws)
    assert all(0.8 <= d["posterior_cortex_mm"] <= 1.6 and 0.9 <= d["posterior_core_factor"] <= 1.4 for d in draws)
    assert 0.02 < np.mean([d["fracture"] for d in draws]) < 0.2


def test_cli_writes_layout(tmp_path):
    from bmd_d2.phantoms.cli import main

    out = tmp_path / "ds"
    assert main(["--out", str(out), "-n", "2", "--tiny", "--no-prepare", "--quiet", "--seed", "3"]) == 0
    for sid in ("phantom_00000", "phantom_00001"):
        d = out / "studies" / sid
        for name in ("labels.nii.gz", "cores.nii.gz", "preview.png", "phantom.json"):
            assert (d / name).is_file(), name
        assert len(list((d / "dicom").glob("*.dcm"))) > 40
    with open(out / "bmd.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["study_id"] for r in rows} == {"phantom_00000", "phantom_00001"}
    # extending the dataset keeps the old rows
    assert main(["--out", str(out), "-n", "1", "--start", "2", "--tiny", "--no-prepare", "--quiet"]) == 0
    with open(out / "bmd.csv", newline="") as f:
        assert {r["study_id"] for r in csv.DictReader(f)} == {"phantom_00000", "phantom_00001", "phantom_00002"}
    # impossible option combination → exit code 2, no traceback
    assert main(["--out", str(out), "-n", "1", "--tiny", "--storage", "unsigned", "--fov-padding", "true",
                 "--quiet", "--no-prepare"]) == 2


def test_rescan_same_patient_new_noise_and_position(tmp_path):
    """``rescan_seed``: same anatomy, BMD and scanner; new noise, position, scan start and series UIDs."""
    base = ph.generate_study(7, ph.PhantomOptions.tiny())
    r1 = ph.generate_study(7, ph.PhantomOptions.tiny(rescan_seed=1))
    r1b = ph.generate_study(7, ph.PhantomOptions.tiny(rescan_seed=1))
    r2 = ph.generate_study(7, ph.PhantomOptions.tiny(rescan_seed=2))
    assert np.array_equal(r1.hu, r1b.hu) and r1.params == r1b.params  # deterministic
    keys = ("level", "bmd_mg_cm3", "fractured", "height_mm", "depth_mm", "width_mm")
    for other in (r1, r2):
        assert [tuple(t[k] for k in keys) for t in other.truth] == [tuple(t[k] for k in keys) for t in base.truth]
        for t0, t1 in zip(base.truth, other.truth):  # partial volume on the shifted grid moves the core HU a little
            assert abs(t0["trabecular_hu"] - t1["trabecular_hu"]) < 2.0
        changed = {k for k in base.params if base.params[k] != other.params.get(k)}
        assert {"body_offset", "recon_offset", "z_l3"} <= changed
        assert not changed & {"calib_a", "calib_b", "noise_sd", "bmd_mg_cm3", "slice_thickness", "kvp", "size"}
        assert other.params["rescan_seed"] in (1, 2) and not np.allclose(other.affine, base.affine)
    assert "rescan_seed" not in base.params
    assert not np.array_equal(r1.hu[:10], r2.hu[:10])
    uids = []
    for st in (base, r1, r2):
        ph.write_dicom_series(st, tmp_path / str(st.params.get("rescan_seed", 0)))
        uids.append(pydicom.dcmread(next((tmp_path / str(st.params.get("rescan_seed", 0))).glob("*.dcm")),
                                    stop_before_pixels=True).SeriesInstanceUID)
    assert len(set(uids)) == 3
    with pytest.raises(ValueError):
        ph.PhantomOptions.tiny(rescan_seed=-1).validate()
