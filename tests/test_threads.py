"""bmd_d2.utils.threads: the thread budget (cores capped by OMP_NUM_THREADS), and that slices decoded on several
threads give the one-thread (and pydicom's) values exactly."""
import os

import numpy as np
import pydicom
import pytest

from _dicom_fixtures import write_series
from bmd_d2.data.dicom import load_series
from bmd_d2.utils.threads import cpu_threads


def test_cpu_threads_follows_cores_omp_num_threads_and_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == 4 and cpu_threads(2) == 2 and cpu_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3 and cpu_threads(8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert cpu_threads() == 4  # never more than the usable cores
    for junk in ("", "0", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert cpu_threads() == 4, junk


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
def test_threaded_decoding_equals_pydicom_and_one_thread(tmp_path, ts, monkeypatch):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 1500, size=(12, 40, 36)).astype(np.float32)
    paths = write_series(tmp_path / "s", hu, transfer_syntax=ts, intercept=-1024.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = load_series(tmp_path / "s", dtype="auto")
    monkeypatch.delenv("OMP_NUM_THREADS")
    many = load_series(tmp_path / "s", dtype="auto", workers=4)
    assert one.data.dtype == many.data.dtype == np.int16
    np.testing.assert_array_equal(one.data, many.data)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        np.testing.assert_array_equal(many.data[k], ds.pixel_array * float(ds.RescaleSlope) +
                                      float(ds.RescaleIntercept))
