"""Measure many studies on Ray: one actor per worker loads the model once; dynamic scheduling, retries of crashed
workers, resume, and the same per-study and batch files as :func:`bmd_d2.engine.batch.run_batch`.

:func:`run_ray_batch` runs on a local Ray instance (``num_cpus`` = workers × CPUs per worker, no dashboard) or, with
``address``, on a running cluster. Each :class:`StudyWorker` actor builds one ``BMDStudyPredictor``, measures one
study at a time and writes its reports into ``<out>/<study_id>/`` itself (:func:`bmd_d2.engine.batch.measure_study`):
only a small outcome (status, reason, seconds, node id) travels back to the driver. The driver keeps one study in
flight per actor and gives the next one to whichever actor is free (``ray.wait``).

Failures:

* a study that raises (a ``BMDError``, a corrupt file, a non-CT series) is a failed outcome with its one-line reason,
  not retried;
* a worker that dies while measuring (segfault, OOM kill, SIGKILL, a lost node; ``RayActorError``) is replaced by a
  fresh actor and the study retried, up to ``retries`` times; then it fails with the reason "worker crashed N times
  while measuring: <cause>";
* a study over ``study_timeout`` seconds has its actor killed (``ray.kill``) and counts as a crash (cause: timeout);
* a worker that cannot load the model stops the batch with that ``BMDError`` (a user error: weights, calibration);
  workers that keep dying while they start (three in a row) stop it with one clear error.

On a cluster the inputs and the output folder must be on storage every node sees at the same path: a worker that
cannot see the output folder or a study's source reports it as that study's failure reason.

Test-only hooks (read by the driver, passed to the actors): ``BMD_BATCH_TEST_PAUSE=<study_id>:<seconds>:<pid file>``
(several joined by ``;``) makes the actor that gets that study write its pid to the file and sleep before measuring
(once: not when the file exists); ``BMD_BATCH_TEST_CRASH=<study_id>[,<study_id>...]`` makes the actor exit at once
(``os._exit``) on them.
"""
import collections
import logging
import os
import re
import socket
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from bmd_d2 import reports
from bmd_d2.errors import BMDError, one_line
from bmd_d2.utils.threads import usable_cores

from .batch import BatchSummary, StudyOutcome, finished_outcome, measure_study, write_batch_files

logger = logging.getLogger(__name__)

PAUSE_ENV = "BMD_BATCH_TEST_PAUSE"
CRASH_ENV = "BMD_BATCH_TEST_CRASH"
_START_FAILURES = 3  # workers dying in a row while they start: the batch stops
_SHARED_STORAGE = "on a Ray cluster the inputs and the output folder must be on storage every node mounts at the " \
                  "same path"


class StudyWorker:
    """The Ray actor of one worker: one ``BMDStudyPredictor`` (built once), studies measured one at a time.

    Args:
        cfg: the frozen measuring config (``MODEL.DEVICE`` falls back to the CPU where this node has no CUDA).
        out_root: absolute output folder (shared storage on a cluster).
        cpus: torch threads and ``OMP_NUM_THREADS`` of this actor (its Ray ``num_cpus``).
        overlay, masks, dicom: the optional reports (:func:`bmd_d2.reports.write_study`).
        cwd: the driver's working directory (relative paths in the config count from it), when this node has it.
        quiet, verbosity: the command line's log settings (:func:`bmd_d2.utils.logs.setup_cli_logging`).
        hooks: the test-only hooks of the module docstring (``{env var: value}``).
    """

    def __init__(self, cfg, *, out_root: str, cpus: int = 1, overlay: bool = True, masks: bool = False,
                 dicom: Tuple[str, ...] = (), cwd: str = "", quiet: bool = False, verbosity: int = 0,
                 hooks: Optional[Dict[str, str]] = None):
        os.environ["OMP_NUM_THREADS"] = str(cpus)  # read by the parallel DICOM decoder, like torch's own pool
        import ray
        import torch

        from bmd_d2.utils.logs import setup_cli_logging

        torch.set_num_threads(cpus)
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        setup_cli_logging(quiet=quiet, verbosity=verbosity)
        self.out_root = out_root
        self.options = {"overlay": overlay, "masks": masks, "dicom": tuple(dicom)}
        self.hooks = dict(hooks or {})
        self.node = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self.error = ""
        self.predictor = None
        try:
            from bmd_d2.config import available_device
            from bmd_d2.measure.predictor import BMDStudyPredictor

            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE)
            cfg.freeze()
            self.predictor = BMDStudyPredictor(cfg)
        except Exception as e:  # reported by ready(): the driver stops the batch with it
            self.error = reports.one_line_reason(e)

    def ready(self) -> Dict:
        """``{"node", "host", "pid", "error"}``; ``error`` is why the model could not be loaded ("" when it was)."""
        return {"node": self.node, "host": self.host, "pid": os.getpid(), "error": self.error}

    def measure(self, study_id: str, source: str) -> Dict:
        """Measure one study and write its reports; returns its :class:`StudyOutcome` as a dict."""
        self._test_hooks(study_id)
        problem = self._not_visible(source)
        if problem:
            outcome = StudyOutcome(study_id, source, "failed", reason=problem)
        else:
            outcome = measure_study(lambda src, sid: self.predictor(src, study_id=sid), study_id, source,
                                    self.out_root, **self.options)
        outcome.node = self.node
        return asdict(outcome)

    def _not_visible(self, source: str) -> str:
        if not os.path.isdir(self.out_root) or not os.access(self.out_root, os.W_OK):
            return (f"output folder {self.out_root} not found or not writable on worker node {self.host} "
                    f"({_SHARED_STORAGE})")
        if not os.path.exists(source):
            return f"input {source} not found on worker node {self.host} ({_SHARED_STORAGE})"
        return ""

    def _test_hooks(self, study_id: str):
        for pause in filter(None, self.hooks.get(PAUSE_ENV, "").split(";")):
            sid, seconds, pid_file = pause.split(":", 2)
            if sid == study_id and not os.path.exists(pid_file):
                with open(pid_file + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(pid_file + ".tmp", pid_file)
                time.sleep(float(seconds))
        if study_id in self.hooks.get(CRASH_ENV, "").split(","):
            os._exit(1)


def crash_cause(e: BaseException) -> str:
    """Ray's one-line cause of a dead worker (e.g. "The actor is dead because its worker process has died. Worker
    exit type: SYSTEM_ERROR Worker exit detail: ... End of file."), without the list of possible causes."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("\t")]
    line = lines[-1] if lines else type(e).__name__
    line = re.split(r"\s+(?:Some common causes|There are some potential root causes)", line)[0]
    line = one_line(line)
    return line if len(line) <= 300 else line[:297] + "..."


class _Slot:
    """One actor as the driver sees it: starting (``ready_ref``), free, or busy with one study (``task``)."""

    def __init__(self, handle, ready_ref):
        self.handle = handle
        self.ready_ref = ready_ref
        self.created = time.time()
        self.ready = False
        self.node = ""
        self.task = None  # (ref, study_id, source, started)


class _Scheduler:
    def __init__(self, actor_class, make_kwargs: Dict, *, size: int, retries: int, study_timeout: Optional[float],
                 startup_timeout: float, on_outcome, cluster: bool):
        self.actor_class = actor_class
        self.make_kwargs = make_kwargs
        self.size = size
        self.retries = retries
        self.study_timeout = study_timeout
        self.startup_timeout = startup_timeout
        self.on_outcome = on_outcome
        self.cluster = cluster
        self.slots: List[_Slot] = []
        self.crashes: Dict[str, int] = {}
        self.start_failures = 0

    def _new_slot(self):
        handle = self.actor_class.remote(**self.make_kwargs)
        self.slots.append(_Slot(handle, handle.ready.remote()))

    def _drop(self, slot: _Slot):
        import ray

        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # already dead
            pass

    def run(self, pending: List[Tuple[str, str]]):
        import ray

        queue = collections.deque(pending)
        while queue or any(s.task for s in self.slots):
            busy = sum(1 for s in self.slots if s.task)
            while len(self.slots) < min(self.size, len(queue) + busy):
                self._new_slot()
            for slot in self.slots:
                if slot.ready and slot.task is None and queue:
                    sid, src = queue.popleft()
                    slot.task = (slot.handle.measure.remote(sid, src), sid, src, time.time())
            refs = {}
            for slot in self.slots:
                if slot.task:
                    refs[slot.task[0]] = slot
                elif not slot.ready:
                    refs[slot.ready_ref] = slot
            done, _ = ray.wait(list(refs), num_returns=1, timeout=self._wait_s())
            for ref in done:
                slot = refs[ref]
                if slot.task and slot.task[0] == ref:
                    self._finished(slot, queue)
                else:
                    self._started(slot)
            self._check_timeouts(queue)
            self._check_startup()

    def _wait_s(self) -> float:
        wait = 1.0
        if self.study_timeout:
            now = time.time()
            for s in self.slots:
                if s.task:
                    wait = min(wait, max(0.01, s.task[3] + self.study_timeout - now))
        return wait

    def _started(self, slot: _Slot):
        import ray

        try:
            info = ray.get(slot.ready_ref)
        except ray.exceptions.RayError as e:
            self._drop(slot)
            self.start_failures += 1
            logger.warning("a Ray worker died while starting (%d in a row): %s", self.start_failures, crash_cause(e))
            if self.start_failures >= _START_FAILURES:
                raise BMDError(f"Ray workers keep dying while they start ({self.start_failures} in a row): "
                               f"{crash_cause(e)}") from None
            return
        if info["error"]:
            self._drop(slot)
            where = f"worker on {info['host']}: " if self.cluster else ""
            raise BMDError(f"{where}{info['error']}")
        self.start_failures = 0
        slot.ready = True
        slot.node = info["node"]

    def _finished(self, slot: _Slot, queue):
        import ray

        ref, sid, src, started = slot.task
        slot.task = None
        try:
            outcome = StudyOutcome(**ray.get(ref))
        except ray.exceptions.RayTaskError as e:  # an exception outside measure_study's isolation: not retried
            outcome = StudyOutcome(sid, src, "failed", reason=reports.one_line_reason(e.cause), node=slot.node,
                                   seconds=time.time() - started)
        except ray.exceptions.RayError as e:  # the worker died: RayActorError, a lost node, ...
            self._drop(slot)
            self._crashed(sid, src, crash_cause(e), slot.node, started, queue)
            return
        outcome.crashes = self.crashes.get(sid, 0)
        self.on_outcome(outcome)

    def _crashed(self, sid: str, src: str, cause: str, node: str, started: float, queue):
        n = self.crashes.get(sid, 0) + 1
        self.crashes[sid] = n
        if n > self.retries:
            times = "once" if n == 1 else f"{n} times"
            self.on_outcome(StudyOutcome(sid, src, "failed", reason=f"worker crashed {times} while measuring: {cause}",
                                         node=node, crashes=n, seconds=time.time() - started))
            return
        logger.warning("study %s: worker crashed (%s); retrying (%d of %d)", sid, cause, n, self.retries)
        queue.appendleft((sid, src))

    def _check_timeouts(self, queue):
        if not self.study_timeout:
            return
        now = time.time()
        for slot in list(self.slots):
            if slot.task and now - slot.task[3] > self.study_timeout:
                _ref, sid, src, started = slot.task
                self._drop(slot)
                self._crashed(sid, src, f"timeout: measuring took over {self.study_timeout:g} s (--study-timeout)",
                              slot.node, started, queue)

    def _check_startup(self):
        if any(s.ready for s in self.slots):
            return
        starting = [s for s in self.slots if not s.ready]
        if starting and time.time() - min(s.created for s in starting) > self.startup_timeout:
            raise BMDError(f"no Ray worker started within {self.startup_timeout:g} s (each needs "
                           f"{self.make_kwargs['cpus']} CPU(s); cluster resources: {_resources()})")


def _resources() -> str:
    import ray

    try:
        r = ray.cluster_resources()
        return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if k in ("CPU", "GPU", "memory"))
    except Exception:
        return "unknown"


def _start_ray(address: Optional[str], num_cpus: int, verbosity: int):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage anywhere
    level = logging.INFO if verbosity >= 1 else logging.ERROR
    try:
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=True)
        else:
            # "local": a new instance even where RAY_ADDRESS names a cluster (that is what --ray-address is for)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=level,
                     log_to_driver=True)
    except Exception as e:
        what = f"cannot connect to the Ray cluster at {address}" if address else "cannot start a local Ray instance"
        raise BMDError(f"{what}: {one_line(e)}") from None


def run_ray_batch(cfg, studies: List[Tuple[str, str]], out_root: str, *, workers: Optional[int] = None,
                  cpus_per_worker: int = 1, address: Optional[str] = None, retries: int = 2,
                  study_timeout: Optional[float] = None, overlay: bool = True, masks: bool = False,
                  dicom: Tuple[str, ...] = (), resume: bool = True, progress: bool = True, quiet: bool = False,
                  verbosity: int = 0, startup_timeout: float = 600.0) -> BatchSummary:
    """Measure ``studies`` on Ray and write the batch files (module docstring); never stops on one study.

    Args:
        cfg: the measuring config (frozen), as for ``BMDStudyPredictor``.
        studies: ``(study_id, source)`` pairs (:func:`bmd_d2.engine.batch.find_studies`).
        out_root: output folder.
        workers: actors; default: the CPUs (this machine's, or the cluster's) // ``cpus_per_worker``; never more
            than the studies left to measure.
        cpus_per_worker: Ray ``num_cpus`` of each actor, its torch threads and ``OMP_NUM_THREADS``.
        address: a running cluster (``ray.init(address=...)``); None starts a local instance.
        retries: how often a study whose worker died is measured again before it fails.
        study_timeout: seconds a study may take before its actor is killed (a crash); None: no limit.
        overlay, masks, dicom: which optional reports to write (:func:`bmd_d2.reports.write_study`).
        resume: skip finished studies (:func:`bmd_d2.engine.batch.finished_outcome`), before any dispatch.
        progress: a tqdm bar on stderr (rate, ETA).
        quiet, verbosity: the workers' log settings (the command line's ``-q``/``-v``).
        startup_timeout: seconds to wait for a first worker to start (e.g. a cluster without a free CPU).

    Returns:
        The summary (``engine`` "ray"; ``this_run`` has the studies per node and the worker crashes); the batch
        files are written.

    Raises:
        BMDError: Ray cannot start or be reached, a worker cannot load the model, workers keep dying at start.
    """
    from tqdm import tqdm

    if cpus_per_worker < 1:
        raise BMDError(f"--cpus-per-worker must be at least 1, not {cpus_per_worker}")
    t0 = time.time()
    out_root = os.path.abspath(out_root)
    os.makedirs(out_root, exist_ok=True)
    studies = [(sid, os.path.abspath(src)) for sid, src in studies]
    requested = reports.requested_outputs(masks=masks, dicom=dicom)
    outcomes: Dict[str, StudyOutcome] = {}
    pending = []
    for sid, src in studies:
        done = finished_outcome(out_root, sid, src, requested) if resume else None
        if done is None:
            pending.append((sid, src))
        else:
            outcomes[sid] = done
    summary = BatchSummary(engine="ray", workers=0)
    bar = tqdm(total=len(studies), initial=len(outcomes), desc="measuring", unit="study",
               disable=not progress or None)
    failed = [0]

    def on_outcome(o: StudyOutcome):
        outcomes[o.study_id] = o
        if o.status == "failed":
            failed[0] += 1
            logger.error("study %s failed: %s", o.study_id, o.reason)
            bar.set_postfix(failed=failed[0], refresh=False)
        bar.update(1)

    try:
        if pending:
            import ray

            size = workers or max(1, usable_cores() // cpus_per_worker)
            _start_ray(address, min(size, len(pending)) * cpus_per_worker, verbosity)
            try:
                cpus = ray.cluster_resources().get("CPU", 0)
                if cpus < cpus_per_worker:
                    raise BMDError(f"--cpus-per-worker {cpus_per_worker}: the Ray cluster has {cpus:g} CPU(s)")
                if address and not workers:
                    size = max(1, int(cpus // cpus_per_worker))
                size = min(size, len(pending))
                summary.workers = size
                options = {"num_cpus": cpus_per_worker, "max_restarts": 0}
                gpus = ray.cluster_resources().get("GPU", 0)
                if str(cfg.MODEL.DEVICE).startswith("cuda") and gpus:
                    options["num_gpus"] = min(1.0, gpus / size)
                actor_class = ray.remote(**options)(StudyWorker)
                kwargs = {"cfg": cfg, "out_root": out_root, "cpus": cpus_per_worker, "overlay": overlay,
                          "masks": masks, "dicom": tuple(dicom), "cwd": os.getcwd(), "quiet": quiet,
                          "verbosity": verbosity,
                          "hooks": {k: os.environ[k] for k in (PAUSE_ENV, CRASH_ENV) if os.environ.get(k)}}
                logger.info("measuring %d studies on %d Ray workers (%s)", len(pending), size,
                            f"cluster {address}" if address else "local")
                _Scheduler(actor_class, kwargs, size=size, retries=retries, study_timeout=study_timeout,
                           startup_timeout=startup_timeout, on_outcome=on_outcome, cluster=bool(address)).run(pending)
            finally:
                ray.shutdown()
    finally:
        bar.close()
    summary.outcomes = sorted(outcomes.values(), key=lambda o: o.study_id)
    summary.seconds = time.time() - t0
    write_batch_files(summary, out_root)
    return summary
