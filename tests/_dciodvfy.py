"""dciodvfy (dicom3tools, David Clunie): an independent DICOM IOD validator for the objects the tests write.

``dciodvfy FILE`` prints to stderr: first the IOD it recognised (e.g. ``Segmentation``), then one line per finding,
each starting ``Error - ``, ``Warning - `` or (file unreadable, no IOD) ``Abort - ``; nested-item context lines
(``Element=...``, ``>``) carry no finding. Its exit status is not a reliable "valid" signal, so the lines are parsed.

Without dciodvfy the tests that need it skip with the reason, except under CI (environment variable ``CI`` set to
anything but ``""``/``0``/``false``), where a missing validator fails them. Debian/Ubuntu: ``apt-get install
dicom3tools`` (``tools/test.sh`` does it when run as root).
"""
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

TIMEOUT_S = 60


@dataclass
class Report:
    """Parsed dciodvfy output of one file."""

    path: str
    iod: str = ""
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    output: str = ""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def executable() -> Optional[str]:
    return shutil.which("dciodvfy")


def require() -> str:
    """The dciodvfy path; skips the test without it (fails under CI)."""
    exe = executable()
    if exe is None:
        msg = "dciodvfy (Debian package dicom3tools) is not installed: DICOM outputs are not validated"
        if in_ci():
            pytest.fail(f"{msg} (CI is set: the validator is required)")
        pytest.skip(msg)
    return exe


def parse(text: str, path: str = "") -> Report:
    """Split dciodvfy output into the IOD name, errors (``Error -`` and ``Abort -`` lines) and warnings."""
    rep = Report(path=path, output=text)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Error - ") or s.startswith("Abort - "):
            rep.errors.append(s)
        elif s.startswith("Warning - "):
            rep.warnings.append(s)
        elif s and not rep.iod and " - " not in s and not s.startswith((">", "Element")):
            rep.iod = s
    return rep


def validate(path: str) -> Report:
    """Run dciodvfy on ``path`` and parse what it prints."""
    exe = require()
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
    return parse(proc.stdout + proc.stderr, str(path))


def assert_valid(path: str, iod: Optional[str] = None) -> List[str]:
    """Assert dciodvfy finds no error in ``path`` (and recognises ``iod`` when given); return its warnings."""
    rep = validate(path)
    assert not rep.errors, f"dciodvfy {path}: {len(rep.errors)} error(s):\n" + "\n".join(rep.errors)
    if iod is not None:
        assert rep.iod == iod, f"dciodvfy {path}: recognised {rep.iod!r}, expected {iod!r}\n{rep.output}"
    return rep.warnings
