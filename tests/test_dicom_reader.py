"""The DICOM reader's fast path agrees with its pydicom path on the whole test corpus (issue 17).

Corpus: every file of the header-corpus variants (tests/test_header_corpus.py's generator: every attribute the loader
reads removed and emptied, phantom and real series), every file bundled with pydicom that the corpus test reads, the
phantom series in every transfer syntax the phantom writer offers, the fixture series (implicit VR, RLE, JPEG-LS,
JPEG 2000, a long private header, a multi-frame file) and the real series (tests/data/real).

For every file: the fast walker's header (``_fast_header``) and pydicom's (``_pydicom_header``) hold the same value
for every attribute the loader uses (the same malformed ones too); the stored pixels read the fast way
(``read_frame_into`` at the walker's offset, JPEG-LS by CharLS) equal pydicom's decoding; and the source header the
loader keeps for the DICOM writers (``SourceHeader.dataset``) is the dataset ``dcmread(stop_before_pixels=True)``
gives: equal elements, file meta, preamble, encoding, and byte-identical when written. Where the fast path declines a
file (the walker falls back to pydicom, or the kept header to reading the file) the file is counted, and the counts
are asserted: agree means equal where both read it.
"""
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _dicom_fixtures import block_phantom, write_multiframe, write_series  # noqa: E402
from bmd_d2 import BMDError  # noqa: E402
from bmd_d2.data.dicom import reader  # noqa: E402
from bmd_d2.data.dicom.series import _check_image_format  # noqa: E402
from test_header_corpus import (ATTRIBUTES, MODES, N_PHANTOM, N_REAL, REAL, _copy_subset,  # noqa: E402
                                _pydicom_data_files, _write_variant)

# the header keys the loader uses: every attribute the walker reads, and the malformed values kept for messages
FIELDS = [kw for kw, _ in reader.TAGS.values()] + ["_malformed"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{group name: [file paths]} of every DICOM (and non-DICOM) file the tests generate or use."""
    from bmd_d2.phantoms import TRANSFER_SYNTAXES, DicomStyle, PhantomOptions, generate_study, write_dicom_series

    root = tmp_path_factory.mktemp("reader_corpus")
    groups = {}
    st = generate_study(0, PhantomOptions.tiny(metal=False, fracture=False))
    for ts in TRANSFER_SYNTAXES:
        style = DicomStyle(transfer_syntax=ts, storage="unsigned" if ts == "jpegls" else "signed")
        groups[f"phantom-{ts}"] = [str(p) for p in write_dicom_series(st, root / f"phantom_{ts}", style=style)]
    # the header-corpus variants, written by that test's generator from the same kind of bases
    ph = root / "phantom_explicit"
    _copy_subset([str(p) for p in ph.iterdir()], N_PHANTOM, root / "hc" / "phantom" / "base")
    _copy_subset([os.path.join(REAL, f) for f in os.listdir(REAL)], N_REAL, root / "hc" / "real" / "base")
    for src in ("phantom", "real"):
        base = root / "hc" / src / "base"
        files = [str(p) for p in sorted(base.iterdir())]
        for i, kw in enumerate(ATTRIBUTES):
            for mode in MODES:
                folder = root / "hc" / src / f"v{i:02d}{mode[0]}"
                _write_variant(base, folder, kw, mode)
                files += [str(p) for p in sorted(folder.iterdir())]
        groups[f"header-corpus-{src}"] = files
    hu = block_phantom(shape=(4, 32, 40), spacing=(2.0, 2.0, 2.0))[0]
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
               "1.2.840.10008.1.2.4.90"):
        groups[f"fixture-{ts}"] = write_series(root / f"fx_{ts}", hu, transfer_syntax=ts)
    groups["fixture-12bit-unsigned"] = write_series(root / "fx_u12", hu, signed=False, bits_stored=12,
                                                    intercept=-1024.0, transfer_syntax="1.2.840.10008.1.2.1")
    long = write_series(root / "fx_long", hu, transfer_syntax="1.2.840.10008.1.2.1")
    for i, p in enumerate(long):
        ds = pydicom.dcmread(p)
        ds.add_new(0x00291010, "OB", bytes(40000 if i % 2 else 70000))
        ds.add_new(0x00291020, "UN", bytes(range(256)) * 8)
        ds.save_as(p)
    groups["fixture-long-header"] = long
    mf = root / "mf.dcm"
    write_multiframe(str(mf), hu)
    groups["fixture-multiframe"] = [str(mf)]
    groups["real"] = [os.path.join(REAL, f) for f in sorted(os.listdir(REAL))]
    groups["pydicom-data"] = [str(p) for p in _pydicom_data_files()[1]]
    yield groups
    shutil.rmtree(root, ignore_errors=True)


def _headers(path):
    """(fast header or None where the walker declines, pydicom header or the BMDError it raised)."""
    try:
        fast = reader._fast_header(path)
        fast["_path"] = path
    except reader._Unsupported:
        fast = None
    except (OSError, Exception) as ex:  # an error the public reader turns into BMDError
        fast = ex
    try:
        ref = reader._pydicom_header(path)
        ref["_path"] = path
    except BMDError as ex:
        ref = ex
    return fast, ref


def _fields(h):
    """The loader's fields of a header; an empty value counts as missing (the loader reads both alike), and the
    components of multi-valued text are compared stripped (the walker strips them; pydicom keeps the padding inside
    a value, e.g. ImageType 'DERIVED \\PRIMARY' in pydicom's 693_J2KI.dcm)."""
    out = {k: h[k] for k in FIELDS if k in h and h[k] not in ("", None, [], [""])}
    for kw, kind in reader.TAGS.values():
        if kind == "m" and kw in out:
            out[kw] = [str(v).strip() for v in out[kw]]
    return out


def _stored_fast(h):
    """Stored values the fast way: straight read at the offset, or imagecodecs' direct decode of a compressed frame
    (the reader uses it once it agreed with pydicom on a folder's first slice; here every frame is compared)."""
    if reader.reads_direct(h):
        dst = np.empty((int(h["Rows"]), int(h["Columns"])), reader.stored_dtype(h))
        reader.read_frame_into(h, dst)
        return dst
    direct = reader._fast_decode(h) if reader._fast_key(h) is not None else None
    return direct if direct is not None else reader.decode_frame(h)


def _encoded(ds):
    """The dataset written as pydicom writes it (its own encoding), or the exception's type."""
    fp = io.BytesIO()
    try:
        ds.save_as(fp, enforce_file_format=False)
    except Exception as ex:  # pydicom refuses some of its own odd test files
        return type(ex).__name__
    return fp.getvalue()


def _same_dataset(built, path):
    ref = pydicom.dcmread(path, stop_before_pixels=True)
    assert built.filename == ref.filename == path
    assert built.preamble == ref.preamble
    assert built.original_encoding == ref.original_encoding, path
    assert built.file_meta == ref.file_meta, path
    assert built.file_meta.original_encoding == ref.file_meta.original_encoding
    assert [e.tag for e in built] == [e.tag for e in ref], path
    try:
        same = built == ref
    except Exception as ex:  # a value that does not convert: it must fail the same way in both
        with pytest.raises(type(ex)):
            ref == ref
        same = True
    assert same, path
    assert _encoded(built) == _encoded(ref), path


def test_fast_and_pydicom_paths_agree_on_the_corpus(corpus):
    counts = {"files": 0, "walker_declined": 0, "pydicom_cannot_read": 0, "frames_compared": 0,
              "frames_not_loadable": 0, "kept_header_declined": 0, "kept_header_compared": 0}
    declined = []
    for group, files in corpus.items():
        for path in files:
            counts["files"] += 1
            fast, ref = _headers(path)
            if isinstance(ref, BMDError):  # pydicom cannot read it: neither may the walker (it must decline)
                counts["pydicom_cannot_read"] += 1
                assert fast is None or isinstance(fast, Exception), (group, path)
                continue
            if fast is None:
                counts["walker_declined"] += 1
                declined.append((group, os.path.basename(path)))
                src = ref["_source"]
            else:
                assert not isinstance(fast, Exception), (group, path, fast)
                assert _fields(fast) == _fields(ref), (group, path)
                src = fast["_source"]
                # the stored pixels: the fast way equals pydicom's decoding, where the file is a loadable image
                single = not fast.get("PerFrameFunctionalGroupsSequence") and int(fast.get("NumberOfFrames") or 1) == 1
                try:
                    if not (fast.get("Rows") and fast.get("Columns")) or not single:
                        raise BMDError("not a single-frame image")
                    _check_image_format(fast, set())
                    _check_image_format(ref, set())
                    want = reader.decode_frame(ref)  # no pixel offset in a pydicom header: pydicom decodes
                except BMDError:
                    counts["frames_not_loadable"] += 1
                else:
                    try:
                        got = _stored_fast(fast)
                    except BMDError as ex:  # the fast read refuses: pydicom's decoding must have refused too
                        pytest.fail(f"{group} {path}: fast read failed ({ex}) where pydicom decoded")
                    assert got.dtype.kind == want.dtype.kind and np.array_equal(got, want), (group, path)
                    counts["frames_compared"] += 1
            built = src.dataset(path)
            if built is None:
                counts["kept_header_declined"] += 1
                continue
            _same_dataset(built, path)
            counts["kept_header_compared"] += 1
    # (counts on this corpus: 1466 files, walker declined 125, pydicom cannot read 15, 1188 frames compared)
    assert counts["files"] >= 1400, counts
    by_group = {}
    for g, name in declined:
        by_group.setdefault(g, []).append(name)
    # the walker declines only pydicom's odd files (big endian, deflated, damaged, ...) and the variants without a
    # usable transfer syntax (TransferSyntaxUID removed or emptied and the like): 3 variants per source at most
    assert set(by_group) <= {"pydicom-data", "header-corpus-phantom", "header-corpus-real"}, (counts, by_group)
    assert len(by_group.get("header-corpus-phantom", ())) <= 3 * N_PHANTOM, by_group
    assert len(by_group.get("header-corpus-real", ())) <= 3 * N_REAL, by_group
    assert counts["walker_declined"] <= 150 and counts["pydicom_cannot_read"] <= 30, counts
    assert counts["frames_compared"] >= 1100, counts
    assert counts["kept_header_declined"] == 0, counts
    assert counts["kept_header_compared"] >= counts["files"] - counts["pydicom_cannot_read"], counts


def test_source_header_is_a_new_dataset_each_time(tmp_path):
    """The writers may edit the datasets they get: the kept header is never changed by that."""
    hu = block_phantom(shape=(2, 16, 16), spacing=(2.0, 2.0, 2.0))[0]
    path = write_series(tmp_path / "s", hu, transfer_syntax="1.2.840.10008.1.2.1")[0]
    for h in (reader._fast_header(path), reader._pydicom_header(path)):
        a = h["_source"].dataset(path)
        a.PatientName = "CHANGED"
        del a.SOPInstanceUID
        b = h["_source"].dataset(path)
        assert b.PatientName != "CHANGED" and "SOPInstanceUID" in b
        _same_dataset(b, path)


def test_loaded_volume_keeps_the_source_headers(tmp_path):
    from bmd_d2.data.dicom import load_nifti, load_volume

    hu = block_phantom(shape=(3, 16, 16), spacing=(2.0, 2.0, 2.0))[0]
    write_series(tmp_path / "s", hu, transfer_syntax="1.2.840.10008.1.2")
    vol = load_volume(str(tmp_path / "s"))
    assert list(vol.source_headers) == vol.meta["files"]
    for f, src in vol.source_headers.items():
        _same_dataset(src.dataset(f), f)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert load_nifti(str(tmp_path / "v.nii.gz")).source_headers == {}
    assert Path(vol.meta["files"][0]).is_file()


def test_writers_use_the_kept_headers_without_reading_the_files(tmp_path, monkeypatch):
    """The DICOM writers' source datasets come from the loader's headers (no second parse); a file not kept (e.g.
    swapped since) is still read from disk."""
    import dataclasses
    import types

    from bmd_d2.data.dicom import load_volume
    from bmd_d2.reports import dicom_sources

    hu = block_phantom(shape=(3, 16, 16), spacing=(2.0, 2.0, 2.0))[0]
    write_series(tmp_path / "s", hu, transfer_syntax="1.2.840.10008.1.2.1")
    vol = load_volume(str(tmp_path / "s"))
    want = [pydicom.dcmread(f, stop_before_pixels=True) for f in vol.meta["files"]]
    read = []
    real_dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda f, **kw: read.append(f) or real_dcmread(f, **kw))
    got = dicom_sources.read_source_datasets(types.SimpleNamespace(volume=vol, study={}))
    assert read == [] and got == want and [ds.filename for ds in got] == vol.meta["files"]
    other = dataclasses.replace(vol, source_headers={})
    assert dicom_sources.read_source_datasets(types.SimpleNamespace(volume=other, study={})) == want
    assert read == vol.meta["files"]
