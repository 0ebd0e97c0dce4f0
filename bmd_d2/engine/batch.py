"""Measure a folder of many studies: discovery, sharding by rank, failure isolation, resume, summary.

Discovery rule (:func:`discover_studies`), for an input folder:

* ``<input>/studies/`` exists (the dataset layout) → each entry under it is a study;
* otherwise each non-hidden entry of ``<input>`` is a study: a ``.nii``/``.nii.gz`` file, or a folder (its ``dicom/``
  subfolder when there is one, else the whole folder, searched recursively for DICOM files).

Output layout (``<out>/``): ``<study_id>/{result.json, vertebrae.csv, overlay.png[, masks.nii.gz]}`` per study,
``studies.csv`` (one row per study incl. failures), ``all_vertebrae.csv``, ``failures.csv`` (study_id, source,
reason), ``summary.json``. A study is finished when its ``result.json`` says so (``outputs.complete``, written last,
atomically, after every requested output; :func:`bmd_d2.reports.is_finished`); a rerun with resume skips finished
studies, re-measures unfinished ones (temporary files of an interrupted write are removed) and retries failed ones. The
batch-level files describe the whole batch, whichever run measured each study, so a batch killed at any moment
(even SIGKILL) and run again ends with the same files as one run without interruption; what this run did is in
``summary.json["this_run"]``. With ``torch.distributed`` (Detectron2 ``launch``),
rank ``r`` of ``w`` measures the sorted studies ``r, r + w, r + 2w, …``; rank 0 writes the batch-level files after
all ranks are done.
"""
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from bmd_d2 import reports
from bmd_d2.errors import BMDError
from bmd_d2.utils.files import NIFTI_SUFFIXES, atomic_write_text, sanitize_study_id, study_id_from_path

logger = logging.getLogger(__name__)


def safe_study_dir(out_root: str, study_id: str) -> str:
    """``<out_root>/<study_id>``, checked to lie inside ``out_root``.

    Raises:
        BMDError: the id would escape the output folder.
    """
    root = os.path.realpath(out_root)
    path = os.path.realpath(os.path.join(root, study_id))
    if os.path.dirname(path) != root:
        raise BMDError(f"study id {study_id!r} would write outside the output folder")
    return path


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def looks_like_single_study(path: str) -> bool:
    """Whether an input path is one study (a file, a folder holding non-NIfTI files directly, or one with a
    ``dicom/`` subfolder) rather than a folder of studies."""
    if os.path.isfile(path):
        return True
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "dicom")):
        return True
    for e in os.scandir(path):
        if e.name.startswith("."):
            continue
        if e.is_file() and not _is_nifti(e.name):
            return True
    return False


def discover_studies(root: str, exclude: Tuple[str, ...] = ()) -> List[Tuple[str, str]]:
    """``(study_id, source)`` pairs under ``root`` by the module's discovery rule, sorted by id; ids made unique.

    Args:
        root: input folder.
        exclude: paths to leave out (e.g. the output folder when it lies inside the input).

    Raises:
        BMDError: ``root`` is not a readable folder or holds no study.
    """
    if not os.path.isdir(root):
        raise BMDError("input folder not found", path=root)
    base = os.path.join(root, "studies") if os.path.isdir(os.path.join(root, "studies")) else root
    excl = {os.path.realpath(p) for p in exclude}
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError as e:
        raise BMDError(f"cannot list input folder: {e.strerror}", path=base) from None
    found = []
    for e in entries:
        if e.name.startswith(".") or os.path.realpath(e.path) in excl:
            continue
        if e.is_file() and _is_nifti(e.name):
            found.append((study_id_from_path(e.path), e.path))
        elif e.is_dir():
            src = os.path.join(e.path, "dicom") if os.path.isdir(os.path.join(e.path, "dicom")) else e.path
            found.append((sanitize_study_id(e.name), src))
    if not found:
        raise BMDError("no studies found (expected study folders or .nii/.nii.gz files)", path=root)
    seen: Dict[str, int] = {}
    out = []
    for sid, src in found:
        n = seen.get(sid.lower(), 0)
        seen[sid.lower()] = n + 1
        out.append((sid if n == 0 else f"{sid}-{n + 1}", src))
    return sorted(out)


@dataclass
class StudyOutcome:
    """What happened to one study in a batch: ``status`` is "ok", "skipped" (already finished) or "failed"."""

    study_id: str
    source: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    output_warning: bool = False  # measured, but an optional output failed (QC flag output_not_written)


@dataclass
class BatchSummary:
    outcomes: List[StudyOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def to_dict(self) -> Dict:
        """The batch's state (whichever run measured each study) plus ``this_run``: what this run did."""
        done = [o for o in self.outcomes if o.status in ("ok", "skipped")]
        return {"studies": len(self.outcomes), "measured": len(done),
                "with_output_warnings": sum(o.output_warning for o in done), "failed": self.count("failed"),
                "failures": [{"study_id": o.study_id, "reason": o.reason} for o in self.outcomes
                             if o.status == "failed"],
                "this_run": {"measured": self.count("ok"), "skipped": self.count("skipped"),
                             "failed": self.count("failed"), "seconds": round(self.seconds, 3)}}

    def text(self) -> str:
        d = self.to_dict()
        r = d["this_run"]
        warn = f", {d['with_output_warnings']} with output warnings" if d["with_output_warnings"] else ""
        return (f"{d['studies']} studies: {d['measured']} measured ({r['measured']} this run, {r['skipped']} already "
                f"done){warn}, {d['failed']} failed in {r['seconds']:.1f} s")


def run_batch(measure: Callable[[str, str], object], studies: List[Tuple[str, str]], out_root: str, *,
              overlay: bool = True, masks: bool = False, resume: bool = True, rank: Optional[int] = None,
              world_size: Optional[int] = None, progress: bool = True, dicom: Tuple[str, ...] = ()) -> BatchSummary:
    """Measure ``studies`` (this rank's share), writing each study's reports; never stops on one study's failure.

    Args:
        measure: ``measure(source, study_id) -> StudyResult`` (e.g. a :class:`BMDStudyPredictor`).
        studies: ``(study_id, source)`` pairs (all ranks pass the same list).
        out_root: output folder.
        overlay, masks, dicom: which optional reports to write (``dicom``: see :func:`bmd_d2.reports.write_study`).
        resume: skip finished studies (:func:`bmd_d2.reports.is_finished` with the optional outputs asked for now).
        rank, world_size: shard; default from ``detectron2.utils.comm``.
        progress: show a progress bar (tqdm, on stderr) on the main process.

    Returns:
        The summary over all ranks on rank 0 (after every rank finished); this rank's share elsewhere. Rank 0 also
        writes ``studies.csv``, ``all_vertebrae.csv``, ``failures.csv`` and ``summary.json``.
    """
    from detectron2.utils import comm
    from tqdm import tqdm

    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    os.makedirs(out_root, exist_ok=True)
    shard = studies[rank::world_size]
    requested = reports.requested_outputs(masks=masks, dicom=dicom)
    t0 = time.time()
    outcomes: List[StudyOutcome] = []
    bar = tqdm(shard, desc=f"measuring (rank {rank})" if world_size > 1 else "measuring", unit="study",
               disable=not progress or None, position=rank if world_size > 1 else None, leave=rank == 0)
    for sid, src in bar:
        t = time.time()
        try:
            out_dir = safe_study_dir(out_root, sid)
            done = reports.read_result(out_dir) if resume else None
            if reports.is_finished_result(done, requested):
                outcomes.append(StudyOutcome(sid, src, "skipped",
                                             output_warning="output_not_written" in (done.get("qc_flags") or [])))
                continue
            result = measure(src, sid)
            reports.write_study(result, out_dir, overlay=overlay, masks=masks, dicom=dicom)
            outcomes.append(StudyOutcome(sid, src, "ok", seconds=time.time() - t,
                                         output_warning="output_not_written" in result.qc_flags))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # isolate every study: one bad input must not stop the batch
            reason = reports.one_line_reason(e)
            logger.error("study %s failed: %s", sid, reason)
            logger.debug("study %s traceback", sid, exc_info=True)
            outcomes.append(StudyOutcome(sid, src, "failed", reason=reason, seconds=time.time() - t))
    bar.close()

    gathered = comm.gather(outcomes, dst=0) if world_size > 1 and comm.get_world_size() > 1 else [outcomes]
    summary = BatchSummary(seconds=time.time() - t0)
    if rank != 0 or not gathered:
        summary.outcomes = outcomes
        return summary
    summary.outcomes = sorted((o for part in gathered for o in part), key=lambda o: o.study_id)
    write_batch_files(summary, out_root)
    return summary


def write_batch_files(summary: BatchSummary, out_root: str):
    """Write ``studies.csv``, ``all_vertebrae.csv``, ``failures.csv`` and ``summary.json`` (atomically)."""
    study_rows, vert_text = [], []
    for o in summary.outcomes:
        if o.status == "failed":
            study_rows.append(reports.study_row({"study_id": o.study_id}, "failed", o.reason))
            continue
        d = reports.read_result(os.path.join(out_root, o.study_id))
        if d is None:
            study_rows.append(reports.study_row({"study_id": o.study_id}, "failed", "result.json unreadable"))
            continue
        study_rows.append(reports.study_row(d, "ok"))
        try:
            with open(os.path.join(out_root, o.study_id, reports.VERTEBRAE_CSV), encoding="utf-8") as f:
                lines = f.read().splitlines()
            vert_text.extend(lines[1:])
        except OSError:
            pass
    atomic_write_text(os.path.join(out_root, "studies.csv"), reports.csv_text(study_rows, reports.STUDY_COLUMNS))
    atomic_write_text(os.path.join(out_root, "all_vertebrae.csv"),
                      "\n".join([",".join(reports.VERTEBRA_COLUMNS)] + vert_text) + "\n")
    fails = [{"study_id": o.study_id, "source": o.source, "reason": o.reason} for o in summary.outcomes
             if o.status == "failed"]
    atomic_write_text(os.path.join(out_root, "failures.csv"), reports.csv_text(fails, ["study_id", "source", "reason"]))
    atomic_write_text(os.path.join(out_root, "summary.json"), json.dumps(summary.to_dict(), indent=2) + "\n")
