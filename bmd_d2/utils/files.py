"""File helpers shared by every writer: atomic replacement and JSON-ready values.

Every file bmd_d2 writes goes to a temporary name in the same folder and is moved into place with ``os.replace``, so
a reader (or a resumed batch) never sees a half-written file. Study ids derived from paths are file-name-safe.
"""
import hashlib
import math
import os
import re
import tempfile
from contextlib import contextmanager

import numpy as np


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path`` (same suffix); on success it replaces ``path``, on error it is removed.

    Example::

        with atomic_path("out/overlay.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str):
    """Write ``text`` (UTF-8) to ``path`` atomically, fsync'ed before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def json_ready(x, *, nonfinite_to_none: bool = True):
    """``x`` with only JSON types: numpy scalars and arrays → Python, tuples → lists, dict keys → str.

    Args:
        nonfinite_to_none: NaN/±inf → None (strict JSON, the default); False keeps them as floats (``json`` then
            writes ``NaN``/``Infinity``, which Python's reader accepts: the phantom truth files rely on it).
    """
    if isinstance(x, dict):
        return {str(k): json_ready(v, nonfinite_to_none=nonfinite_to_none) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v, nonfinite_to_none=nonfinite_to_none) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist(), nonfinite_to_none=nonfinite_to_none)
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if (math.isfinite(x) or not nonfinite_to_none) else None
    return x


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LEN = 80
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def sanitize_study_id(name: str) -> str:
    """A file-name-safe study id: only ``[A-Za-z0-9._-]``, no leading dots, at most 80 characters, never empty.

    Anything else (path separators, ``..``, spaces, control characters) becomes ``_``, so an id can never name a
    path outside the output folder. Over-long names keep a prefix plus a hash of the full name.
    """
    s = _SAFE.sub("_", str(name)).strip("._-")
    s = re.sub(r"\.{2,}", "_", s)
    if len(s) > MAX_ID_LEN:
        s = s[:MAX_ID_LEN - 9] + "-" + hashlib.sha1(str(name).encode()).hexdigest()[:8]
    return s or "study"


def short_hash(text: str) -> str:
    """The short identifier of a text (a path, a UID) in file names and logs: SHA-1, first 12 hex digits."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:12]


def study_id_from_path(path: str) -> str:
    """Study id from a source path: the file name without ``.nii[.gz]``/``.dcm``; for ``…/<id>/dicom`` the ``<id>``."""
    p = os.path.normpath(str(path))
    name = os.path.basename(p)
    low = name.lower()
    for suf in NIFTI_SUFFIXES + (".dcm",):
        if low.endswith(suf):
            name = name[: -len(suf)]
            break
    if name.lower() == "dicom" and os.path.basename(os.path.dirname(p)):
        name = os.path.basename(os.path.dirname(p))
    return sanitize_study_id(name)
