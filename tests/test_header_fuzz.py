"""Property-based fuzzing of the DICOM header reader (issue 16, point 4) on mutated bytes of real headers.

Seeds: one file of a phantom series (explicit VR little endian, raw pixels) and one of the fixture series (implicit
VR, private block), both given nested undefined-length sequences (standard and private), and one file of the real
series (JPEG 2000, a DCMTK file with defined-length sequences). Mutations: byte flips, truncation, inserted and
deleted bytes, mutated VR and length fields (huge ones included), damaged sequence items and delimiters, and bytes of
the geometry values replaced (digits, signs, separators, padding, binary). For every mutant, ``_read_header`` and
``load_volume`` return or raise ``BMDError`` (one line, naming the file) within a time bound, and a mutant that loads
has exactly the geometry and HU that pydicom reads from the same bytes (pydicom is the independent reference: a file
whose geometry it cannot read must not load either; a default the loader assumes must come with a warning).
Hypothesis runs derandomized, without an example database, with a fixed number of examples per seed.
"""
import io
import logging
import os
import struct
import time

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _dicom_fixtures import block_phantom, write_series
from bmd_d2 import BMDError
from bmd_d2.data.dicom import load_volume
from bmd_d2.data.dicom.reader import read_header as _read_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "tests", "data", "real", "totalseg_example_ct_dicom", "dicom")
EXAMPLES = {"phantom_explicit": 800, "fixture_implicit": 800, "real_j2k": 150}
MAX_SECONDS = 5.0  # per mutant, reading the header and loading the volume
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_DELIMITERS = (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0")  # item, item end, sequence end
# the attributes whose values the loader turns into geometry and HU: their value bytes get their own mutation
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope",
            "RescaleIntercept", "BitsAllocated", "BitsStored", "PixelRepresentation")
_GEOMETRY_TAGS = {pydicom.datadict.tag_for_keyword(k) for k in GEOMETRY}
# what the reference reads: the geometry, the rest of the Image Pixel module and the pixels
READ_TAGS = list(GEOMETRY) + ["SamplesPerPixel", "PhotometricInterpretation", "HighBit", "NumberOfFrames",
                              "PlanarConfiguration", "PixelData"]


class Seed:
    """One seed file's bytes and the byte offsets the structured mutations aim at."""

    def __init__(self, path: str):
        self.data = open(path, "rb").read()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        # elements: (start, explicit VR?, long length field?) for the file meta and the top-level data set
        self.elements = []
        pos = 132
        while pos + 8 <= len(self.data) and self.data[pos:pos + 2] == b"\x02\x00":
            vr = self.data[pos + 4:pos + 6].decode("latin-1")
            self.elements.append((pos, True, vr in _LONG))
            pos += (12 + struct.unpack_from("<I", self.data, pos + 8)[0] if vr in _LONG
                    else 8 + struct.unpack_from("<H", self.data, pos + 6)[0])
        fp = io.BytesIO(self.data)
        fp.seek(pos)
        self.values = []  # (offset, length) of the geometry values
        for el in pydicom.filereader.data_element_generator(fp, self.implicit, True):
            tell = getattr(el, "value_tell", None)
            if tell is None or el.tag == 0x7FE00010:
                self.pixel_start = tell - (8 if self.implicit else 12) if el.tag == 0x7FE00010 else None
                if el.tag == 0x7FE00010:
                    break
                continue
            long = not self.implicit and el.VR in _LONG
            self.elements.append((tell - (8 if self.implicit or not long else 12), not self.implicit, long))
            if el.tag in _GEOMETRY_TAGS and el.length:
                self.values.append((tell, el.length))
        self.header_end = self.pixel_start + 12
        self.delims = [i for d in _DELIMITERS for i in _find_all(self.data[:self.header_end], d)]
        assert len(self.elements) > 30 and len(self.values) == len(GEOMETRY)


def _find_all(buf: bytes, sub: bytes):
    i = buf.find(sub)
    while i >= 0:
        yield i
        i = buf.find(sub, i + 1)


def _add_nested_sequences(path: str) -> None:
    """Give the file undefined-length sequences (a standard one holding a nested sequence, and a private one) written
    in its own transfer syntax, so that the mutations can damage items and delimiters at two depths."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(path)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121311", "DCM", "Localizer"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    ref.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([ref, ref])
    block = ds.private_block(0x0011, "BMD_D2 FUZZ", create=True)
    inner = Dataset()
    inner.add_new(0x00111010, "LO", "inner")
    block.add_new(0x20, "SQ", Sequence([inner]))
    for kw in ("ReferencedImageSequence",):
        ds[kw].is_undefined_length = True
    ds[0x00111020].is_undefined_length = True
    for item in (ref, code, inner):
        item.is_undefined_length_sequence_item = True
    ref["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from bmd_d2.phantoms import PhantomOptions, generate_study, write_dicom_series

    root = tmp_path_factory.mktemp("fuzz_seeds")
    study = generate_study(2, PhantomOptions.tiny(metal=False, fracture=False))
    ph = write_dicom_series(study, root / "phantom")
    fx = write_series(str(root / "fixture"), block_phantom(shape=(3, 32, 32))[0], private_block=True)
    real = sorted(os.listdir(REAL))
    _add_nested_sequences(str(ph[len(ph) // 2]))
    _add_nested_sequences(fx[1])
    out = {"phantom_explicit": Seed(str(ph[len(ph) // 2])), "fixture_implicit": Seed(fx[1]),
           "real_j2k": Seed(os.path.join(REAL, real[len(real) // 2]))}
    for p in ph:
        os.remove(p)
    return out, root


# Mutations: each draws its parameters as fractions and applies them to a seed (so one strategy fits every seed).
_frac = st.floats(0.0, 1.0, exclude_max=True)
_HUGE = st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x10000000, 0xFFFF, 0xFFFE, 0, 1, 3])
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), _frac, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _frac),
    st.tuples(st.just("insert"), _frac, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), _frac, st.integers(1, 16)),
    st.tuples(st.just("vr"), _frac, st.sampled_from([b"UN", b"SQ", b"OB", b"DS", b"US", b"UL", b"\x00\x00", b"zz",
                                                      b"\xff\xff", b"UT", b"LO"])),
    st.tuples(st.just("length"), _frac, st.one_of(_HUGE, st.integers(0, 0xFFFFFFFF))),
    st.tuples(st.just("delimiter"), _frac, st.sampled_from(["drop", "length", "swap"]), _HUGE),
    st.tuples(st.just("value"), _frac, _frac, st.sampled_from(list(b"0123456789.-+eE \\\x00\x01\xff"))),
)


def mutate(seed: Seed, data: bytearray, m) -> bytearray:
    kind, f = m[0], m[1]
    hdr = min(seed.header_end, len(data))
    if not hdr:
        return data
    if kind == "flip":
        i = int(f * hdr)
        data[i] ^= m[2]
    elif kind == "truncate":
        del data[int(f * len(data)):]
    elif kind == "insert":
        i = int(f * hdr)
        data[i:i] = m[2]
    elif kind == "delete":
        i = int(f * hdr)
        del data[i:i + m[2]]
    elif kind in ("vr", "length"):
        start, explicit, long = seed.elements[int(f * len(seed.elements))]
        if start + 12 > len(data):
            return data
        if kind == "vr" and explicit:
            data[start + 4:start + 6] = m[2]
        elif kind == "vr":  # implicit: an explicit-looking VR in the length field's first bytes
            data[start + 4:start + 6] = m[2]
        elif explicit and not long:
            struct.pack_into("<H", data, start + 6, m[2] & 0xFFFF)
        else:
            struct.pack_into("<I", data, start + (8 if explicit else 4), m[2])
    elif kind == "value":  # one byte of a geometry value: another digit, sign, separator, padding or binary byte
        start, length = seed.values[int(f * len(seed.values))]
        i = start + int(m[2] * length)
        if i < len(data):
            data[i] = m[3]
    elif kind == "delimiter" and seed.delims:
        i = seed.delims[int(f * len(seed.delims))]
        if i + 8 > len(data):
            return data
        if m[2] == "drop":
            del data[i:i + 8]
        elif m[2] == "length":
            struct.pack_into("<I", data, i + 4, m[3])
        else:  # an item tag becomes a sequence delimiter and vice versa
            data[i + 2:i + 4] = b"\xdd\xe0" if data[i + 2:i + 4] == b"\x00\xe0" else b"\x00\xe0"
    return data


def _floats(ds, kw):
    v = ds.get(kw)
    return [float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str)
                               else [v])]


# the loader's documented defaults for missing attributes (each with a warning that names the attribute)
DEFAULTS = {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "RescaleSlope": 1.0,
            "RescaleIntercept": 0.0}


def pydicom_reference(path: str):
    """Geometry, rescale and stored pixels as pydicom reads them (with the loader's documented defaults for missing
    attributes, listed in ``ref["defaulted"]``), or the exception it raises."""
    try:
        ds = pydicom.dcmread(path, specific_tags=READ_TAGS)  # damage elsewhere (a text VR, the character set) aside
        ref = {kw: _floats(ds, kw) for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")}
        ref["Rows"], ref["Columns"] = int(ds.Rows), int(ds.Columns)
        ref["defaulted"] = [kw for kw in (*DEFAULTS, "BitsStored") if ds.get(kw) in (None, "")]
        for kw in ref["defaulted"]:
            setattr(ds, kw, DEFAULTS.get(kw, ds.get("BitsAllocated")))
        ref["RescaleSlope"], ref["RescaleIntercept"] = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        ref["pixels"] = np.asarray(ds.pixel_array)
        return ref
    except Exception as ex:  # the reference itself may fail in any way on mutated bytes
        return ex


def check_mutant(path: str, data: bytes) -> bool:
    """The property for one mutant; returns whether it loaded (and so was compared with pydicom)."""
    with open(path, "wb") as f:
        f.write(data)
    t0 = time.monotonic()
    try:
        _read_header(path)
    except BMDError as ex:
        assert "\n" not in str(ex)
    try:
        vol = load_volume(path)
    except BMDError as ex:
        assert "\n" not in str(ex) and path in str(ex), str(ex)
        return False
    finally:
        assert time.monotonic() - t0 < MAX_SECONDS
    ref = pydicom_reference(path)
    assert not isinstance(ref, Exception), f"loaded a file pydicom cannot read ({type(ref).__name__}: {ref})"
    assert vol.shape == (1, ref["Rows"], ref["Columns"])
    for kw in ref["defaulted"]:  # a default assumed is said
        assert any(kw in w for w in vol.warnings), (kw, vol.warnings)
    ipp, iop, ps = (np.array(ref[k]) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))
    np.testing.assert_array_equal(vol.affine[:3, 3], ipp)
    np.testing.assert_allclose(vol.affine[:3, 0], iop[:3] / np.linalg.norm(iop[:3]) * ps[1], rtol=1e-12)
    np.testing.assert_allclose(vol.affine[:3, 1], iop[3:] / np.linalg.norm(iop[3:]) * ps[0], rtol=1e-12)
    hu = ref["pixels"].astype(np.float32) * np.float32(ref["RescaleSlope"]) + np.float32(ref["RescaleIntercept"])
    np.testing.assert_array_equal(vol.data[0], hu)
    return True


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mutated_headers(seeds, name):
    logging.disable(logging.WARNING)  # thousands of loader warnings on mutants
    try:
        _run(seeds, name)
    finally:
        logging.disable(logging.NOTSET)


def _run(seeds, name):
    by_name, root = seeds
    seed = by_name[name]
    path = str(root / f"mutant_{name}.dcm")
    assert check_mutant(path, seed.data)  # the unmutated seed loads and agrees with pydicom
    loaded = []

    @settings(max_examples=EXAMPLES[name], derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(MUTATIONS, min_size=1, max_size=4))
    def prop(muts):
        data = bytearray(seed.data)
        for m in muts:
            data = mutate(seed, data, m)
        loaded.append(check_mutant(path, bytes(data)))

    prop()
    # the comparison with pydicom ran on a fair share of the mutants (not only on rejected ones)
    assert len(loaded) >= EXAMPLES[name] and sum(loaded) >= 0.05 * len(loaded), (sum(loaded), len(loaded))
