"""DICOM SEG / TID 1500 SR / SC outputs, re-read with pydicom + highdicom, checked against the source and result.json.

The study result is built from the phantom's ground-truth masks on the *written and re-loaded* DICOM series (no
model), so the checks are on known truth; one CLI run with the quick config (random weights) checks the wiring.
"""
import json
import logging
import os
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from bmd_d2.config import get_bmd_cfg
from bmd_d2.data.dicom import load_volume
from bmd_d2.levels import LEVEL_TO_LABEL
from bmd_d2.phantoms import PhantomOptions, generate_study, write_study
from bmd_d2.data.sagittal import sagittal_mask_to_volume
from bmd_d2.reports import dicom as do
from bmd_d2.reports import dicom_sources as sources
from bmd_d2 import reports
from bmd_d2.measure.classical import Calibration
from bmd_d2.cli.measure import main
from bmd_d2.measure.predictor import measure_detections

sys.path.insert(0, os.path.dirname(__file__))
import _dciodvfy  # noqa: E402
from test_measure_classical import _gt_detections, truth_sagittal  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Phantom written as DICOM, re-loaded, measured with its ground-truth masks; all reports incl. DICOM written."""
    root = tmp_path_factory.mktemp("dcmout")
    cfg = get_bmd_cfg(QUICK)
    st = generate_study(3, PhantomOptions.tiny(metal=False, fracture=False, scoliosis=False))
    sdir = write_study(st, root / "ph3", preview=False)
    vol = load_volume(str(sdir / "dicom"))
    sag = truth_sagittal(st, vol, cfg)
    dets, _ = _gt_detections(st, sag)
    res = measure_detections(dets, sag, cfg, volume=vol, calibration=Calibration(), study_id="ph3")
    res.model["weights"] = "bmd_rcnn_MFEFPN_R18_cpu.pth"  # what BMDStudyPredictor records (the file name)
    paths = reports.write_study(res, str(root / "out"), dicom=do.KINDS)
    return st, vol, res, paths, json.loads(open(paths["json"]).read())


def test_seg_references_geometry_and_truth(measured):
    st, vol, res, paths, saved = measured
    ds = pydicom.dcmread(paths["dicom_seg"])
    assert ds.SOPClassUID == SEG_CLASS and ds.SegmentationType == "BINARY" and ds.Modality == "SEG"
    assert ds.StudyInstanceUID == vol.meta["StudyInstanceUID"]
    assert ds.FrameOfReferenceUID == vol.meta["FrameOfReferenceUID"]
    assert ds.SeriesInstanceUID != vol.meta["SeriesInstanceUID"]
    ref_series = ds.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == vol.meta["SeriesInstanceUID"]
    refs = {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence}
    assert refs == set(vol.meta["SOPInstanceUIDs"])
    # segments: one per vertebra, cranial -> caudal, exact SCT codes, algorithm bmd_d2 AUTOMATIC
    levels = [v["level"] for v in saved["vertebrae"]]
    assert levels == ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert len(ds.SegmentSequence) == len(levels)
    expect = {"T11": codes.SCT.T11Vertebra, "L1": codes.SCT.L1Vertebra, "L5": codes.SCT.L5Vertebra,
              "S1": codes.SCT.Sacrum}
    for n, (item, lev) in enumerate(zip(ds.SegmentSequence, levels), 1):
        assert item.SegmentNumber == n and item.SegmentLabel.startswith(lev)
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "bmd_d2"
        cat, typ = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("91723000", "SCT")
        assert typ.CodingSchemeDesignator == "SCT" and typ.CodeValue == do.level_code(lev).value
        if lev in expect:
            assert typ.CodeValue == expect[lev].value and typ.CodeMeaning == expect[lev].meaning
    # frames: each lies on a source slice (position and referenced SOP instance agree)
    pos_of = {u: np.array(st_pos) for u, st_pos in zip(vol.meta["SOPInstanceUIDs"],
                                                        (vol.affine[:3, :3] @ [0, 0, k] + vol.affine[:3, 3]
                                                         for k in range(vol.shape[0])))}
    assert ds.NumberOfFrames > 0
    for fr in ds.PerFrameFunctionalGroupsSequence:
        src = fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = np.array([float(x) for x in fr.PlanePositionSequence[0].ImagePositionPatient])
        assert np.allclose(ipp, pos_of[src], atol=1e-3)
    # voxels: inside the slab the sagittal measurement covered, each segment matches the true body of its level
    seg = hd.seg.segread(paths["dicom_seg"])
    uids = vol.meta["SOPInstanceUIDs"]
    pix = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)  # (K, J, I, S)
    assert pix.shape[:3] == vol.shape
    thick = np.asarray(res.sagittal.hu).shape[0] * float(np.linalg.norm(res.sagittal.transform[:3, 2]))
    slab = sagittal_mask_to_volume(res.sagittal, np.ones(res.sagittal.hu.shape[1:], bool), vol.shape, vol.affine,
                                   thickness_mm=thick)
    for s, lev in enumerate(levels):
        m = pix[..., s] > 0
        truth = (st.labels == LEVEL_TO_LABEL[lev]) & slab
        dice = 2 * (m & truth).sum() / (m.sum() + truth.sum())
        assert m.sum() > 50 and (st.labels[m] == LEVEL_TO_LABEL[lev]).mean() > 0.8, lev
        assert dice > 0.8, (lev, dice)


def test_seg_matches_masks_nifti(measured, tmp_path):
    """The SEG and masks.nii.gz come from the same mapping: identical voxels."""
    st, vol, res, paths, saved = measured
    reports.write_masks_nifti(res, str(tmp_path / "m.nii.gz"))
    lab = np.transpose(np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj), (2, 1, 0))
    pix = hd.seg.segread(paths["dicom_seg"]).get_pixels_by_source_instance(
        vol.meta["SOPInstanceUIDs"], combine_segments=True, skip_overlap_checks=True,
        assert_missing_frames_are_empty=True)
    for s, v in enumerate(saved["vertebrae"], 1):
        assert np.array_equal(lab == LEVEL_TO_LABEL[v["level"]], pix == s), v["level"]


def _value(group, name, method=None, derivation=None):
    items = [m for m in group.get_measurements(name=name)
             if (method is None or (m.method is not None and m.method.value == method))
             and (derivation is None or m.derivation == derivation)]
    assert len(items) == 1, (name, method)
    return items[0]


def test_sr_values_equal_json(measured):
    st, vol, res, paths, saved = measured
    raw = pydicom.dcmread(paths["dicom_sr"])
    assert raw.SOPClassUID == SR_CLASS and raw.Modality == "SR"
    assert raw.StudyInstanceUID == vol.meta["StudyInstanceUID"]
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # evidence: the source series (every SOP instance) and the SEG
    seg_ds = pydicom.dcmread(paths["dicom_seg"], stop_before_pixels=True)
    ev = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID: i.ReferencedSOPClassUID for i in s.ReferencedSOPSequence}
          for st_item in raw.CurrentRequestedProcedureEvidenceSequence for s in st_item.ReferencedSeriesSequence}
    assert raw.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == vol.meta["StudyInstanceUID"]
    assert set(ev[vol.meta["SeriesInstanceUID"]]) == set(vol.meta["SOPInstanceUIDs"])
    assert ev[seg_ds.SeriesInstanceUID] == {seg_ds.SOPInstanceUID: SEG_CLASS}

    sr = hd.sr.srread(paths["dicom_sr"])
    observers = sr.content.get_observer_contexts()
    assert observers[0].observer_type == codes.DCM.Device
    assert observers[0].observer_identifying_attributes.name == "bmd_d2"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(saved["vertebrae"])
    bmd_name = {attr: do._private(value, meaning) for _, value, meaning, attr in do.BMD_CODES}
    mg = hd.sr.CodedConcept("mg/cm3", "UCUM", "mg/cm3")
    for n, (g, v) in enumerate(zip(groups, saved["vertebrae"]), 1):
        assert g.reference_type == codes.DCM.ReferencedSegment
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID and ref.referenced_segment_numbers == [n]
        assert ref.referenced_sop_class_uid == SEG_CLASS
        assert ref.source_series_for_segmentation.value == vol.meta["SeriesInstanceUID"]
        assert g.finding_sites[0].value == do.level_code(v["level"])
        assert g.tracking_identifier.startswith(v["level"])
        for attr, name in bmd_name.items():
            if v[attr] is None:
                assert not g.get_measurements(name=name)
                continue
            m = _value(g, name)
            assert m.value == v[attr] and m.unit == mg, (v["level"], attr)
        hu = _value(g, codes.DCM.AttenuationCoefficient, "sagittal-roi", codes.SCT.Mean)
        sd = _value(g, codes.DCM.AttenuationCoefficient, "sagittal-roi", codes.SCT.StandardDeviation)
        assert sd.value == v["trabecular_hu_sd"]
        assert hu.value == v["trabecular_hu"] and hu.unit == codes.UCUM.HounsfieldUnit
        assert hu.unit.value == "[hnsf'U]"
        if v["trabecular_hu_3d"] is not None:
            assert _value(g, codes.DCM.AttenuationCoefficient, "3d-core").value == v["trabecular_hu_3d"]
        cats = g.get_qualitative_evaluations(name=do._private(*do.CATEGORY_NAMES["acr"]))
        assert [c.value.value for c in cats] == ([v["category"]] if v["category"] else [])
        flags = g.get_qualitative_evaluations(name=do._private("qc-flag", "QC flag"))
        assert sorted(f.value.value for f in flags) == sorted(v["qc_flags"])
    # patient group: ACR BMD/category, L1 HU/category, study flags
    (pg,) = sr.content.get_image_measurement_groups()
    p = saved["patient"]
    assert _value(pg, do._private("acr-bmd", "ACR QCT patient BMD, mean of two lumbar vertebrae")).value == p["acr_bmd"]
    assert _value(pg, codes.DCM.AttenuationCoefficient).value == p["l1_hu"]
    assert pg.get_qualitative_evaluations(name=do._private(*do.CATEGORY_NAMES["acr"]))[0].value.value \
        == p["acr_category"]
    assert pg.get_qualitative_evaluations(name=do._private(*do.CATEGORY_NAMES["hu"]))[0].value.value \
        == p["hu_category"]
    flags = pg.get_qualitative_evaluations(name=do._private("qc-flag", "QC flag"))
    assert sorted(f.value.value for f in flags) == sorted(saved["qc_flags"])


def test_sc_and_atomic_files(measured):
    st, vol, res, paths, saved = measured
    sc = pydicom.dcmread(paths["dicom_sc"])
    assert sc.SOPClassUID == SC_CLASS and sc.StudyInstanceUID == vol.meta["StudyInstanceUID"]
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    from PIL import Image

    with Image.open(os.path.join(os.path.dirname(paths["json"]), reports.OVERLAY_PNG)) as im:
        png = np.asarray(im.convert("RGB"))
    assert np.array_equal(sc.pixel_array, png)
    assert tuple(sc.PatientOrientation) == ("P", "F")  # columns anterior -> posterior, rows head -> feet
    # every DICOM object has its own series in the source study; no temporary files left
    series = {pydicom.dcmread(paths[k], stop_before_pixels=True).SeriesInstanceUID for k in
              ("dicom_seg", "dicom_sr", "dicom_sc")}
    assert len(series) == 3 and vol.meta["SeriesInstanceUID"] not in series
    assert not [f for f in os.listdir(os.path.dirname(paths["json"])) if ".tmp" in f or f.startswith(".")]


def test_no_vertebrae_skips_seg_and_nifti_is_not_an_error(measured, tmp_path, caplog):
    st, vol, res, paths, saved = measured
    import copy

    empty = copy.copy(res)
    empty.vertebrae, empty.qc_flags = [], ["no_vertebrae_detected"]
    with caplog.at_level(logging.WARNING):
        out = do.write_dicom_outputs(empty, str(tmp_path), kinds=("seg", "sr"))
    assert set(out) == {"dicom_sr"} and "DICOM SEG not written" in caplog.text
    sr = hd.sr.srread(out["dicom_sr"])
    assert not sr.content.get_volumetric_roi_measurement_groups()
    flags = sr.content.get_image_measurement_groups()[0].get_qualitative_evaluations(
        name=do._private("qc-flag", "QC flag"))
    assert [f.value.value for f in flags] == ["no_vertebrae_detected"]
    nifti = copy.copy(res)
    nifti.volume = type(vol)(vol.data, vol.affine, meta={"source": "ct.nii.gz", "format": "nifti"})
    with pytest.raises(sources.DicomOutputsUnavailable, match="need a DICOM series"):
        do.write_dicom_outputs(nifti, str(tmp_path / "n"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert do.write_if_possible(nifti, str(tmp_path / "n"), do.KINDS) == {}
    assert "DICOM outputs skipped" in caplog.text


def test_cli_writes_dicom_outputs(measured, tmp_path, caplog):
    """Quick config, random weights: whatever is detected, the SR/SC are valid; the SEG exists iff a segment does."""
    st, vol, res, paths, saved = measured
    src = os.path.dirname(vol.meta["files"][0])
    args = [src, "--config-file", QUICK, "-o", str(tmp_path), "--dicom-outputs", "-q", "MEASURE.SCORE_THRESHOLD",
            "0.0", "INPUT.DICOM.IMAGE_SIZE", "256", "INPUT.DICOM.CACHE_DIR", ""]
    torch.manual_seed(0)
    assert main(args) == 0
    sdir = tmp_path / "ph3"
    d = json.loads((sdir / "result.json").read_text())
    sr = hd.sr.srread(str(sdir / do.SR_FILE))
    assert sr.StudyInstanceUID == vol.meta["StudyInstanceUID"]
    assert pydicom.dcmread(str(sdir / do.SC_FILE)).SOPClassUID == SC_CLASS
    assert sr.content.get_observer_contexts()[0].observer_identifying_attributes.model_name == "(random init)"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    if (sdir / do.SEG_FILE).exists():
        seg = hd.seg.segread(str(sdir / do.SEG_FILE))
        assert seg.FrameOfReferenceUID == vol.meta["FrameOfReferenceUID"]
        assert len(groups) == len(seg.SegmentSequence) >= 1
    else:
        assert not groups and "DICOM SEG not written" in caplog.text
    assert len(groups) <= len(d["vertebrae"])
    # NIfTI input: a clear warning, the other reports are written, no DICOM files
    nii = tmp_path / "ct.nii.gz"
    data = np.transpose(vol.data, (2, 1, 0))
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine), str(nii))
    caplog.clear()
    torch.manual_seed(0)
    assert main([str(nii), "--config-file", QUICK, "-o", str(tmp_path / "n"), "--dicom-sr", "-q",
                 "INPUT.DICOM.IMAGE_SIZE", "256", "INPUT.DICOM.CACHE_DIR", ""]) == 0
    assert "DICOM outputs need a DICOM series" in caplog.text
    files = os.listdir(tmp_path / "n" / "ct")
    assert "result.json" in files and not [f for f in files if f.endswith(".dcm")]


def test_uid_helpers_are_valid(measured):
    """Every UID the objects carry is a valid DICOM UID (≤ 64 characters, digits and dots)."""
    st, vol, res, paths, saved = measured
    for k in ("dicom_seg", "dicom_sr", "dicom_sc"):
        ds = pydicom.dcmread(paths[k], stop_before_pixels=True)
        for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            assert UID(getattr(ds, kw)).is_valid, (k, kw)


def test_objects_pass_dciodvfy(measured):
    """dciodvfy (dicom3tools) finds no error in the three objects; its warnings (99BMDD2 is a local coding scheme it
    does not know; docs/dicom_outputs.md) are listed, never counted."""
    st, vol, res, paths, saved = measured
    iods = {"dicom_seg": "Segmentation", "dicom_sr": "Comprehensive3DSR", "dicom_sc": "SCImage"}
    for k, iod in iods.items():
        warnings = _dciodvfy.assert_valid(paths[k], iod)
        print(k, len(warnings), sorted(set(warnings)))
        assert all("99BMDD2" in w for w in warnings), warnings  # nothing else on the phantom
    # de-identified source: PatientIdentityRemoved YES carried over with a De-identification Method (Type 1C)
    for k in iods:
        ds = pydicom.dcmread(paths[k], stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == sources.DEIDENTIFICATION_NOT_RECORDED
    assert pydicom.dcmread(paths["dicom_sc"], stop_before_pixels=True).ImageLaterality == "U"
    # the phantom has every UID: nothing generated, no flag
    assert "generated_uids" not in saved["study"] and sources.UIDS_FLAG not in saved["qc_flags"]


def test_model_name_from_weights(measured):
    """SEG and SR name the model by its weights file (result.model["weights"]), not a key nothing sets."""
    st, vol, res, paths, saved = measured
    seg = pydicom.dcmread(paths["dicom_seg"], stop_before_pixels=True)
    assert seg.ManufacturerModelName == "bmd_rcnn_MFEFPN_R18_cpu"
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert params == "model=bmd_rcnn_MFEFPN_R18_cpu"
    sr = hd.sr.srread(paths["dicom_sr"])
    assert sr.content.get_observer_contexts()[0].observer_identifying_attributes.model_name == \
        "bmd_rcnn_MFEFPN_R18_cpu"
    assert saved["model"]["weights"] == "bmd_rcnn_MFEFPN_R18_cpu.pth"
    model = type(res)(study_id="x")
    assert do.model_name(model) == "bmd_d2"
    model.model = {"weights": "(random init)"}
    assert do.model_name(model) == "(random init)"
    model.model = {"weights": "/models/run3/model_final.pth", "config": "configs/bmd_default.yaml"}
    assert do.model_name(model) == "model_final"
    model.model = {"config": "configs/bmd_default.yaml"}
    assert do.model_name(model) == "bmd_default"


def test_prepare_sources_copies_and_is_deterministic(measured):
    """prepare_sources never changes the datasets it is given; emptied UIDs get the same generated values twice."""
    import copy

    st, vol, res, paths, saved = measured
    raw = sources.read_source_datasets(res)
    for ds in raw:
        ds.StudyInstanceUID = ""
        del ds.SOPInstanceUID
        del ds.PatientBirthDate
    before = [copy.deepcopy(ds) for ds in raw]
    runs = []
    for _ in range(2):
        r = copy.copy(res)
        r.study, r.qc_flags = dict(res.study), list(res.qc_flags)
        prepared = sources.prepare_sources(r, raw)
        runs.append((r.study["generated_uids"], [ds.SOPInstanceUID for ds in prepared]))
        assert sources.UIDS_FLAG in r.qc_flags and sources.UIDS_FLAG not in res.qc_flags
        assert all("PatientBirthDate" in ds and not ds.PatientBirthDate for ds in prepared)  # Type 2: present, empty
        assert {ds.StudyInstanceUID for ds in prepared} == {r.study["generated_uids"]["StudyInstanceUID"]}
        assert sources.prepare_sources(r, prepared) is not prepared \
            and sources.prepare_sources(r, prepared)[0] is prepared[0]
    assert raw == before  # the given datasets are untouched
    assert runs[0] == runs[1]
    gen = runs[0][0]
    assert set(gen) == {"StudyInstanceUID", "SOPInstanceUID"} and gen["SOPInstanceUID"] == runs[0][1]
    assert len(set(runs[0][1])) == len(raw) and all(UID(u).is_valid for u in runs[0][1])
    assert gen["StudyInstanceUID"] != vol.meta["StudyInstanceUID"]


def test_failure_message_names_output_file_and_attribute():
    """Exceptions from highdicom/pydicom become one line naming the output, the source file and the attribute."""
    a, b = pydicom.Dataset(), pydicom.Dataset()
    a.filename, b.filename = "/data/ct/img0001.dcm", "/data/ct/img0002.dcm"
    a.PatientBirthDate = ""
    missing = AttributeError("'FileDataset' object has no attribute 'PatientBirthDate'")
    assert do.failure_message("sr", missing, [a, b]) == \
        "DICOM SR not written: /data/ct/img0002.dcm: PatientBirthDate is missing"
    assert do.failure_message("seg", KeyError(0x00200037), [a]) == \
        "DICOM SEG not written: /data/ct/img0001.dcm: ImageOrientationPatient is missing"
    other = AttributeError("module 'highdicom.sr' has no attribute 'Foo'")
    assert do.failure_message("sc", other, [a]) == \
        "DICOM SC not written: /data/ct/img0001.dcm: AttributeError: module 'highdicom.sr' has no attribute 'Foo'"
    msg = do.failure_message("seg", ValueError("Source images must all be part\nof the same series."), [a])
    assert msg == "DICOM SEG not written: /data/ct/img0001.dcm: ValueError: Source images must all be part of the " \
                  "same series."
    assert do.failure_message("seg", sources.SourceHeaderError("/x/1.dcm: Rows is empty"), [a]) == \
        "DICOM SEG not written: /x/1.dcm: Rows is empty"
