"""Result snapshots: the full ``result.json`` of a fixed set of studies, to prove that a change of code changed no
measurement (``tools/snapshot_results.py``; a refactor's before/after check).

The set (:func:`snapshot_studies`): the demo's example study (with its calibration file, as ``tools/demo.py``
measures it), the real CT as NIfTI and the real DICOM series from ``tests/data/real``, and five held-out phantoms
(the accuracy benchmark's first five: ``study_seed(9000, i)``, full-size options). Results are compared with
:func:`differences`: every key and value equal, floats to ``atol`` (1e-6 by default); only the input path
(``study.source``) is ignored, since the studies are written to a new folder on every run.
"""
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

HELD_OUT_BASE_SEED = 9000
N_HELD_OUT = 5
IGNORED = (("study", "source"),)


def snapshot_studies(workdir: str, repo_root: str) -> List[Tuple[str, str, Optional[str]]]:
    """Write the snapshot studies under ``workdir``; returns ``(name, source path, calibration file or None)``."""
    from bmd_d2.phantoms import (EXAMPLE_SEED, PhantomOptions, example_options, generate_study, study_seed,
                                 write_dicom_series)

    out = []
    st = generate_study(EXAMPLE_SEED, example_options(), "example_0001")
    dicom = os.path.join(workdir, "example_0001", "dicom")
    write_dicom_series(st, dicom)
    cal = os.path.join(workdir, "example_0001", "calibration.json")
    with open(cal, "w") as f:
        json.dump({"slope": st.params["calib_b"], "intercept": st.params["calib_a"], "kvp": st.params["kvp"]}, f)
    out.append(("example_0001", dicom, cal))
    real = os.path.join(repo_root, "tests", "data", "real")
    out.append(("real_ct_nifti", os.path.join(real, "totalseg_example_ct", "example_ct.nii.gz"), None))
    out.append(("real_ct_dicom", os.path.join(real, "totalseg_example_ct_dicom", "dicom"), None))
    for i in range(N_HELD_OUT):
        name = f"heldout_{i:05d}"
        st = generate_study(study_seed(HELD_OUT_BASE_SEED, i), PhantomOptions(preview=False), name)
        dicom = os.path.join(workdir, name, "dicom")
        write_dicom_series(st, dicom)
        out.append((name, dicom, None))
    return out


def comparable(result: Dict[str, Any]) -> Dict[str, Any]:
    """``result`` (a ``StudyResult.to_dict()``) without the keys in :data:`IGNORED`."""
    d = json.loads(json.dumps(result))
    for path in IGNORED:
        node = d
        for k in path[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return d


def differences(a: Any, b: Any, atol: float = 1e-6, path: str = "$") -> List[str]:
    """Where ``a`` and ``b`` differ (JSON-like values; floats within ``atol`` are equal), as ``path: a != b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: missing on one side" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += differences(a[k], b[k], atol, f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, atol, f"{path}[{i}]")]
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python, not in a result
        return [f"{path}: {a!r} != {b!r}"]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=atol):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def compare_folders(reference: str, current: str, names: List[str], atol: float = 1e-6) -> List[str]:
    """Differences between ``<reference>/<name>.json`` and ``<current>/<name>.json`` for every name."""
    out = []
    for name in names:
        ref_path, cur_path = (os.path.join(d, f"{name}.json") for d in (reference, current))
        if not os.path.isfile(ref_path):
            out.append(f"{name}: not in {reference}")
            continue
        with open(ref_path) as f:
            ref = json.load(f)
        with open(cur_path) as f:
            cur = json.load(f)
        out += [f"{name} {d}" for d in differences(ref, cur, atol)]
    return out
