"""The node's worker: completes, filters, measures and delivers series, one step at a time (one thread).

Each :meth:`Worker.step` does the first thing due, in this order:

1. a ``receiving`` series quiet for ``series.quiet_seconds`` becomes ``complete``, then ``duplicate`` (same content
   as a version measured or being measured), ``filtered`` (with the reason) or ``queued``;
2. a due delivery: ``measured`` (or ``retry_wait`` whose time has come) → ``sending`` → ``delivered``, or
   ``retry_wait`` (``first_delay_s`` doubling up to ``max_delay_s``), or ``delivery_failed`` after ``max_attempts``;
3. the oldest ``queued`` series → ``measuring`` → ``measured`` (or ``failed``): one ``BMDStudyPredictor`` loaded at
   start, the reports written by :func:`bmd_d2.reports.study.write_study` exactly as ``bmd-measure`` writes them,
   into ``<folder>/studies/<study hash>/<series hash>/v<version>/``;
4. retention: received images of ``delivered``/``duplicate``/``filtered`` series older than
   ``storage.keep_received_hours`` are deleted.

Test-only hook: ``BMD_SERVE_TEST_PAUSE=<state>:<seconds>`` (e.g. ``measuring:5``) makes the worker sleep that long
right after it recorded the state ``measuring`` or ``sending``, so that a test can kill the node at a known point.
"""
import logging
import os
import re
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

from bmd_d2.data.dicom.reader import read_header
from bmd_d2.errors import BMDError, one_line
from bmd_d2.utils.logs import redact

from .config import NodeConfig
from .sender import DeliveryError, destination_for, send_files
from .store import LIVE, RETAINED, Series, Store, content_hash, uid_hash

logger = logging.getLogger(__name__)

PAUSE_ENV = "BMD_SERVE_TEST_PAUSE"
_SEND_ORDER = ("seg", "sr", "sc")


def test_pause(state: str) -> None:
    """The test-only pause of :data:`PAUSE_ENV` (module docstring)."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == state and seconds:
        logger.info("test pause: %s s after %s", seconds, state)
        time.sleep(float(seconds))


def _header_value(ds, keyword: str) -> Optional[str]:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def filter_reason(cfg: NodeConfig, first, slices: int) -> Optional[str]:
    """Why a complete series is not measured (one line without header values), or None to measure it.

    Args:
        cfg: the node's config (``series`` rules).
        first: the pydicom dataset of the series' first instance (pixel data not read): modality, thickness and the
            include/exclude patterns are read from it.
        slices: the series' frames (instances × NumberOfFrames).
    """
    rules = cfg.series
    modality = str(first.get("Modality", "") or "")
    if modality not in rules.modalities:
        return f"modality {modality or '(none)'} not in series.modalities {list(rules.modalities)}"
    if slices < rules.min_slices:
        return f"{slices} slices, fewer than series.min_slices = {rules.min_slices}"
    thickness = _thickness(first)
    if thickness is not None and thickness > rules.max_slice_thickness_mm:
        limit = rules.max_slice_thickness_mm
        return f"slice thickness {thickness:g} mm above series.max_slice_thickness_mm = {limit:g}"
    for kw, pattern in rules.include.items():
        value = _header_value(first, kw)
        if value is None or not re.search(pattern, value):
            return f"{kw} does not match series.include.{kw}"
    for kw, pattern in rules.exclude.items():
        value = _header_value(first, kw)
        if value is not None and re.search(pattern, value):
            return f"{kw} matches series.exclude.{kw}"
    return None


def _thickness(ds) -> Optional[float]:
    value = ds.get("SliceThickness")
    if value in (None, ""):
        try:  # Enhanced CT: the shared pixel measures
            value = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def result_dir(cfg: NodeConfig, s: Series) -> str:
    """``<folder>/studies/<study hash>/<series hash>/v<version>``."""
    return os.path.join(cfg.folder, "studies", uid_hash(s["study_uid"]), uid_hash(s["series_uid"]),
                        f"v{s['version']}")


class Worker:
    """Completion, filters, measurement, delivery and retention over a :class:`~.store.Store`.

    Args:
        cfg: the node config.
        store: its queue.
        predictor: a callable ``(list of files, study_id=...) -> StudyResult`` (a ``BMDStudyPredictor``); None
            builds one from ``cfg.model`` (:func:`build_predictor`).
        clock: time source (tests).
    """

    def __init__(self, cfg: NodeConfig, store: Store, predictor: Optional[Callable] = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.store = store
        self.predictor = predictor if predictor is not None else build_predictor(cfg)
        self.clock = clock
        self._last_retention = 0.0

    # -- the loop -----------------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Do the first thing due (module docstring); returns False when there was nothing to do."""
        return bool(self.complete_quiet() or self.deliver_due() or self.measure_next() or self.retention())

    def busy(self) -> bool:
        """Whether anything is left that :meth:`step` will do without new input (``retry_wait`` excluded)."""
        return bool(self.store.in_state("receiving", "complete", "queued", "measuring", "measured", "sending"))

    def run(self, stop, *, once: bool = False, poll_s: float = 0.2) -> None:
        """Step until ``stop`` (a ``threading.Event``) is set; with ``once``, also when nothing is left to do."""
        while not stop.is_set():
            if self.step():
                continue
            if once and not self.busy():
                return
            stop.wait(poll_s)

    # -- 1. completion and filters ------------------------------------------------------------------------------------
    def complete_quiet(self) -> int:
        now = self.clock()
        done = 0
        for s in self.store.in_state("receiving", "complete"):
            if s["state"] == "receiving":
                if now - s["last_instance_at"] < self.cfg.series.quiet_seconds:
                    continue
                if not self.store.set_state(s, "complete", expect="receiving"):
                    continue
                logger.info("%s complete: %d instances", s.tag, s["instances"])
            self._triage(s)
            done += 1
        return done

    def _triage(self, s: Series) -> None:
        import pydicom

        rows = self.store.instances(*s.key)
        digest = content_hash([(r["sop_uid"], r["digest"]) for r in rows])
        for other in self.store.receipts(s["series_uid"]):
            if other["receipt"] != s["receipt"] and other["state"] in LIVE and other["content_hash"] == digest:
                reason = f"same content as v{other['version']}"
                self.store.set_state(s, "duplicate", expect="complete", reason=reason, content_hash=digest,
                                     version=other["version"])
                logger.info("%s duplicate: %s (not measured again)", s.tag, reason)
                return
        with self.store.transaction() as db:  # a new content: the next version (a duplicate may have been first)
            s["version"] = self.store.next_version(db, s["series_uid"], s["receipt"])
        try:
            if not rows:
                reason = "no instances"
            else:
                # the first header in full for the rules; the others only for their frame count (the loader's fast
                # header walker, ~20x cheaper than pydicom: the loader reads them again when the series is measured)
                first = pydicom.dcmread(rows[0]["path"], stop_before_pixels=True)
                slices = int(first.get("NumberOfFrames", 1) or 1)
                slices += sum(int(read_header(r["path"]).get("NumberOfFrames") or 1) for r in rows[1:])
                reason = filter_reason(self.cfg, first, slices)
        except Exception as e:
            reason = f"headers cannot be read: {type(e).__name__}"
        if reason:
            self.store.set_state(s, "filtered", expect="complete", reason=reason, content_hash=digest,
                                 version=s["version"])
            logger.info("%s filtered: %s", s.tag, reason)
            return
        self.store.set_state(s, "queued", expect="complete", reason="", content_hash=digest, version=s["version"],
                             result_dir=result_dir(self.cfg, s))
        logger.info("%s queued", s.tag)

    # -- 3. measurement -----------------------------------------------------------------------------------------------
    def measure_next(self) -> bool:
        from bmd_d2.reports.study import write_study

        queued = self.store.in_state("queued", order="created_at")
        if not queued:
            return False
        s = queued[0]
        if not self.store.set_state(s, "measuring", expect="queued"):
            return True
        logger.info("%s measuring", s.tag)
        test_pause("measuring")
        t0 = time.perf_counter()
        out = s["result_dir"] or result_dir(self.cfg, s)
        try:
            files = [r["path"] for r in self.store.instances(*s.key)]
            result = self.predictor(files, study_id=uid_hash(s["series_uid"]))
            result.model["series_version"] = s["version"]  # part of the output UIDs: a new version, new UIDs
            write_study(result, out, dicom=self.cfg.destination.outputs)
        except Exception as e:  # a study that cannot be measured fails alone; the node keeps serving
            expected = isinstance(e, BMDError)
            reason = redact(one_line(e) if expected else f"{type(e).__name__}: {one_line(e)}")
            self.store.set_state(s, "failed", expect="measuring", reason=reason)
            logger.warning("%s failed: %s", s.tag, reason, exc_info=not expected)
            return True
        self.store.set_state(s, "measured", expect="measuring", reason="", result_dir=out)
        logger.info("%s measured in %.1f s: %d vertebrae", s.tag, time.perf_counter() - t0, len(result.vertebrae))
        return True

    # -- 2. delivery --------------------------------------------------------------------------------------------------
    def deliver_due(self) -> bool:
        now = self.clock()
        due = self.store.in_state("measured") + [s for s in self.store.in_state("retry_wait", order="next_attempt_at")
                                                 if s["next_attempt_at"] <= now]
        if not due:
            return False
        s = due[0]
        if not self.store.set_state(s, "sending", expect=s["state"], attempts=s["attempts"] + 1):
            return True
        test_pause("sending")
        files = self.output_files(s)
        if not files:
            self.store.set_state(s, "delivered", expect="sending", reason="no DICOM output to send")
            logger.info("%s delivered: nothing to send", s.tag)
            return True
        try:
            peer = destination_for(self.cfg, s["caller_ae"], s["caller_host"])
            n = send_files(self.cfg, peer, files)
        except DeliveryError as e:
            self._delivery_failed(s, redact(one_line(e)))
            return True
        self.store.set_state(s, "delivered", expect="sending", reason="")
        logger.info("%s delivered: %d objects to %s (attempt %d)", s.tag, n, peer, s["attempts"])
        return True

    def output_files(self, s: Series) -> List[str]:
        """The DICOM objects of a measured series version, in the order they are sent (SEG before the SR)."""
        from bmd_d2.reports.dicom import SC_FILE, SEG_FILE, SR_FILE

        names = {"seg": SEG_FILE, "sr": SR_FILE, "sc": SC_FILE}
        paths = [os.path.join(s["result_dir"], names[k]) for k in _SEND_ORDER if k in self.cfg.destination.outputs]
        return [p for p in paths if os.path.isfile(p)]

    def _delivery_failed(self, s: Series, reason: str) -> None:
        retry = self.cfg.destination.retry
        if retry.max_attempts and s["attempts"] >= retry.max_attempts:
            self.store.set_state(s, "delivery_failed", expect="sending", reason=reason)
            logger.warning("%s delivery failed after %d attempts: %s", s.tag, s["attempts"], reason)
            return
        delay = retry.delay(s["attempts"])
        self.store.set_state(s, "retry_wait", expect="sending", reason=reason, next_attempt_at=self.clock() + delay)
        logger.warning("%s delivery attempt %d failed (%s): retry in %g s", s.tag, s["attempts"], reason, delay)

    # -- 4. retention -------------------------------------------------------------------------------------------------
    def retention(self, every_s: float = 30.0) -> bool:
        now = self.clock()
        if now - self._last_retention < every_s and self.cfg.storage.keep_received_hours > 0:
            return False
        self._last_retention = now
        keep = self.cfg.storage.keep_received_hours * 3600.0
        purged = 0
        for s in self.store.in_state(*RETAINED):
            if s["purged"] or now - s["updated_at"] < keep:
                continue
            for r in self.store.instances(*s.key):
                try:
                    os.remove(r["path"])
                except FileNotFoundError:
                    pass
            shutil.rmtree(os.path.join(self.cfg.folder, "incoming", uid_hash(s["series_uid"]), f"r{s['receipt']}"),
                          ignore_errors=True)
            self.store.mark_purged(s)
            logger.info("%s: received images deleted (retention)", s.tag)
            purged += 1
        return False  # never counts as work: the loop may go idle


def build_predictor(cfg: NodeConfig):
    """One :class:`~bmd_d2.measure.predictor.BMDStudyPredictor` from ``cfg.model`` (CUDA falls back to the CPU)."""
    from bmd_d2.config import available_device, get_bmd_cfg
    from bmd_d2.measure.predictor import BMDStudyPredictor

    m = cfg.model
    opts = list(m.opts)
    if m.weights:
        opts += ["MODEL.WEIGHTS", m.weights]
    opts += ["MODEL.DEVICE", available_device(m.device)]
    return BMDStudyPredictor(get_bmd_cfg(m.config_file, opts))


def summary(store: Store) -> Tuple[Dict[str, int], List[Series]]:
    """(count per state, every series) of a store."""
    rows = store.all_series()
    counts: Dict[str, int] = {}
    for s in rows:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    return counts, rows
