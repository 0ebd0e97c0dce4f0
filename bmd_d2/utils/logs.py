"""Command-line logging: quiet third-party libraries and no patient data (PHI) in any log line.

Levels (:func:`setup_cli_logging`): by default bmd_d2's own loggers show INFO and everything else (highdicom,
pydicom, Detectron2, fvcore, PIL, matplotlib, ...) only warnings and errors; ``verbosity`` 1 (``-v``) shows every
library's INFO, 2 (``-vv``) DEBUG; ``quiet`` shows warnings and errors only. Python ``warnings`` (pydicom reports odd
header values that way) are routed into logging so they pass the same filters; a library's identical message is
shown once per run (:class:`RepeatFilter`), not once per file.

PHI (:class:`PHIFilter`, installed on the command line's handler): every record is checked at every level.

* Values registered with :func:`register_phi` / :func:`register_phi_from_dataset` (patient names and their
  components, IDs, birth date, accession number, study/series/acquisition dates and times, physician and institution
  names: :data:`PHI_KEYWORDS`) are replaced by ``<phi>`` wherever they occur, in bmd_d2's messages and in any
  library's. The DICOM writers register every source header they read.
* Third-party messages additionally lose every quoted value that is not a DICOM keyword (pydicom's "Invalid value
  for VR DA: '19450317'" style) and every date-like run of 8 digits (``<date>``), because they may be emitted while a
  header is being parsed, before its values could be registered.
"""
import logging
import re
import sys
import threading
from collections import OrderedDict
from typing import Iterable

logger = logging.getLogger(__name__)

PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID",
    "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
)
_NOISY = ("highdicom", "pydicom", "detectron2", "fvcore", "iopath", "PIL", "matplotlib", "openjpeg", "ray", "urllib3",
          "numba", "py.warnings")
_MAX_VALUES = 20000
_MIN_LEN = 3  # shorter values ("F", "1") are not identifying and would garble every message

_values: "OrderedDict[str, None]" = OrderedDict()
_pattern = None
_lock = threading.Lock()


_PLACEHOLDERS = {"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "UNKNOWN", "NONE", "NULL", "REMOVED", "DELETED",
                 "PHANTOM", "TEST"}


def _placeholder(s: str) -> bool:
    """A value that identifies nobody: a de-identification placeholder or one repeated character ("000000")."""
    alnum = [c for c in s.upper() if c.isalnum()]
    return len(set(alnum)) < 2 or s.upper().strip("^ ") in _PLACEHOLDERS


def register_phi(values: Iterable) -> None:
    """Add values (strings; other types are converted) that must never appear in a log line."""
    global _pattern
    added = False
    with _lock:
        for v in values:
            s = str(v).strip() if v is not None else ""
            if len(s) < _MIN_LEN or s in _values or _placeholder(s):
                continue
            _values[s] = None
            added = True
            while len(_values) > _MAX_VALUES:
                _values.popitem(last=False)
        if added:
            _pattern = None  # compiled when a record next needs it (_current_pattern), not once per header read


def register_phi_from_dataset(ds) -> None:
    """Register the :data:`PHI_KEYWORDS` values of a pydicom dataset (person names also by component)."""
    values = []
    for kw in PHI_KEYWORDS:
        try:
            elem = ds.get(kw)
        except Exception:  # a damaged value must not stop the caller
            continue
        if elem is None or elem == "":
            continue
        items = list(elem) if isinstance(elem, (list, tuple)) or type(elem).__name__ == "MultiValue" else [elem]
        for it in items:
            s = str(it)
            values.append(s)
            if "^" in s:
                values.extend(p for p in re.split(r"[\^=]", s) if p)
                values.append(" ".join(p for p in s.split("^") if p))
    register_phi(values)


def _current_pattern():
    """The regular expression of the registered values (None when there are none), compiled after a change."""
    global _pattern
    with _lock:
        if _pattern is None and _values:
            _pattern = re.compile("|".join(re.escape(v) for v in sorted(_values, key=len, reverse=True)))
        return _pattern


def clear_phi() -> None:
    """Forget every registered value (tests)."""
    global _pattern
    with _lock:
        _values.clear()
        _pattern = None


_QUOTED = re.compile(r"'([^'\n]{1,200})'|\"([^\"\n]{1,200})\"")
_DATE = re.compile(r"(?<!\d)(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)")


def _is_keyword(s: str) -> bool:
    try:
        from pydicom.datadict import dictionary_VR, keyword_dict
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return False
    if s in keyword_dict or re.fullmatch(r"[A-Z]{2}", s):  # a keyword or a VR ('DA', 'PN')
        return True
    if re.fullmatch(r"\(?[0-9A-Fa-f]{4},\s*[0-9A-Fa-f]{4}\)?", s):
        return True
    try:
        return bool(dictionary_VR(s))
    except (KeyError, ValueError, TypeError):
        return False


def redact(text: str, third_party: bool = False) -> str:
    """``text`` with the registered PHI values removed (and, for ``third_party``, quoted values and dates)."""
    pat = _current_pattern()
    if pat is not None:
        text = pat.sub("<phi>", text)
    if third_party:
        text = _QUOTED.sub(lambda m: m.group(0) if _is_keyword(m.group(1) or m.group(2)) else "'<redacted>'", text)
        text = _DATE.sub("<date>", text)
    return text


class PHIFilter(logging.Filter):
    """Rewrites each record's message (and exception text) through :func:`redact`; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        third_party = not (record.name == "bmd_d2" or record.name.startswith("bmd_d2.") or record.name == "__main__")
        try:
            msg = record.getMessage()
        except Exception:  # a library's bad format string: keep what we have
            msg = str(record.msg)
        record.msg, record.args = redact(msg, third_party), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, redact(text, third_party)
        elif record.exc_text:
            record.exc_text = redact(record.exc_text, third_party)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, third_party)
        return True


class RepeatFilter(logging.Filter):
    """Lets a library's message through once per run: pydicom, for example, warns about the same odd header value
    in every file of a series, which would flood a batch's terminal. bmd_d2's own records always pass."""

    def __init__(self, max_keys: int = 10000):
        super().__init__()
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()
        self._max = max_keys

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bmd_d2" or record.name.startswith("bmd_d2.") or record.name == "__main__":
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True


class _LibraryLevelFilter(logging.Filter):
    """Drops other libraries' records below ``level`` (those :data:`_NOISY` does not name are caught here)."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bmd_d2" or record.name.startswith("bmd_d2.") or record.name == "__main__":
            return True
        return record.levelno >= self.level


def setup_cli_logging(*, quiet: bool = False, verbosity: int = 0, rank: int = 0) -> logging.Handler:
    """Configure the root logger for a command-line run (idempotent): one stderr handler with :class:`PHIFilter`.

    Args:
        quiet: warnings and errors only.
        verbosity: 0 default, 1 third-party INFO, 2 DEBUG everywhere.
        rank: distributed rank; ranks > 0 log warnings only.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_bmd_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(PHIFilter())  # first: the repeat check then compares redacted messages
        handler.addFilter(RepeatFilter())
        handler.addFilter(_LibraryLevelFilter())
        handler._bmd_cli = True
        root.addHandler(handler)
    elif getattr(handler, "stream", None) is not sys.stderr:  # sys.stderr was replaced (e.g. captured): follow it
        handler.acquire()
        try:
            handler.stream = sys.stderr  # not setStream(): it flushes the old stream, which may be closed
        finally:
            handler.release()
    if quiet or rank > 0:
        root_level, libs, own = logging.WARNING, logging.WARNING, logging.NOTSET
    elif verbosity >= 2:
        root_level, libs, own = logging.DEBUG, logging.DEBUG, logging.NOTSET
    elif verbosity == 1:
        root_level, libs, own = logging.INFO, logging.INFO, logging.DEBUG
    else:
        root_level, libs, own = logging.INFO, logging.WARNING, logging.NOTSET
    root.setLevel(root_level)
    logging.getLogger("bmd_d2").setLevel(own)  # NOTSET: follows the root (a test's caplog can still lower it)
    for name in _NOISY:
        logging.getLogger(name).setLevel(libs)
    for f in handler.filters:
        if isinstance(f, _LibraryLevelFilter):
            f.level = libs
    logging.captureWarnings(True)
    return handler
