"""tools/benchmark_batch.py: every corruption of the cohort fails with its own reason (never a number), and the tool
end to end on tiny phantoms (one in-process throughput run; the fault run's kills are tests/test_batch_ray.py's)."""
import json
import os
import sys

import numpy as np
import pytest

from bmd_d2.data.dicom import load_volume
from bmd_d2.errors import BMDError
from bmd_d2.evaluation.benchmark_batch import CORRUPTIONS, corrupt_study
from bmd_d2.phantoms import PhantomOptions, generate_study, write_dicom_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quick_schedules", "bmd_rcnn_MFEFPN_instant_test.yaml")
sys.path.insert(0, os.path.join(ROOT, "tools"))

REASONS = {"not_dicom": "no DICOM images found", "truncated": "truncated pixel data", "non_ct": "no CT image series",
           "empty": "holds no files", "mixed_size": "mixed matrix sizes"}


@pytest.mark.parametrize("transfer_syntax", ["explicit", "jpegls"])
def test_each_corruption_fails_with_its_reason(tmp_path, transfer_syntax):
    assert set(REASONS) == set(CORRUPTIONS)
    st = generate_study(4100, PhantomOptions.tiny(transfer_syntax=transfer_syntax))
    rng = np.random.default_rng(0)
    for kind in CORRUPTIONS:
        folder = tmp_path / kind
        write_dicom_series(st, str(folder))
        assert load_volume(str(folder)).data.shape == st.hu.shape  # intact before
        detail = corrupt_study(str(folder), kind, rng)
        assert detail
        with pytest.raises(BMDError) as e:
            load_volume(str(folder))
        assert REASONS[kind] in str(e.value), (kind, str(e.value))
        assert "\n" not in str(e.value)


def test_benchmark_batch_cli_tiny(tmp_path, capsys):
    import benchmark_batch

    out = tmp_path / "batch.json"
    rc = benchmark_batch.main(["--config-file", QUICK, "--phantom", "tiny", "--root", str(tmp_path / "cohort"),
                               "--studies", "5", "--corrupt-fraction", "0.2", "--workers", "1",
                               "--throughput-studies", "3", "--skip-fault", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "studies/hour" in text and "in-process" in text
    rep = json.loads(out.read_text())
    assert rep["cohort"]["studies"] == 5 and rep["cohort"]["corrupt"] == 1
    (tp,) = rep["throughput"]
    assert tp["workers"] == 1 and tp["engine"] == "in-process" and tp["exit_code"] == 0
    assert tp["measured"] == 3 and tp["studies_per_hour"] > 0 and tp["wall_s"] >= tp["batch_s"] > 0
    cohort = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert [c["kind"] for c in cohort].count("good") == 4
    # a second run reuses the cohort as written (the corruption is not applied twice)
    assert benchmark_batch.main(["--phantom", "tiny", "--root", str(tmp_path / "cohort"), "--studies", "5",
                                 "--corrupt-fraction", "0.2", "--generate-only"]) == 0
    assert json.loads((tmp_path / "cohort" / "cohort.json").read_text()) == cohort
