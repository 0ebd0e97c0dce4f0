"""Measure many studies: discovery (a folder or a manifest), failure isolation, resume, summary; the in-process engine.

Two engines share this module's discovery, resume check, per-study step and batch files: :func:`run_batch` (one
process, or static sharding by rank under Detectron2's ``launch``) and :func:`bmd_d2.engine.ray_batch.run_ray_batch`
(Ray actors, dynamic scheduling, retries of crashed workers).

Discovery rule (:func:`discover_studies`), for an input folder:

* ``<input>/studies/`` exists (the dataset layout) → each entry under it is a study;
* otherwise each non-hidden entry of ``<input>`` is a study: a ``.nii``/``.nii.gz`` file, or a folder (its ``dicom/``
  subfolder when there is one, else the whole folder, searched recursively for DICOM files).

A manifest (:func:`read_manifest`, a ``.csv`` file) lists the studies instead: column ``path`` (a study as above:
a file, a DICOM folder or a folder with a ``dicom/`` subfolder; relative paths count from the manifest's folder),
optional column ``study_id`` (else the id comes from the path, made unique as for a folder).

Output layout (``<out>/``): ``<study_id>/{result.json, vertebrae.csv, overlay.png[, masks.nii.gz]}`` per study,
``studies.csv`` (one row per study incl. failures), ``all_vertebrae.csv``, ``failures.csv`` (study_id, source,
reason), ``summary.json``, and the two tables as Parquet too (``studies.parquet``, ``all_vertebrae.parquet``: the
CSVs' rows and columns, numbers typed, empty cells null). A study is finished when its ``result.json`` says so
(``outputs.complete``, written last, atomically, after every requested output; :func:`bmd_d2.reports.is_finished`);
a rerun with resume skips finished studies, re-measures unfinished ones (temporary files of an interrupted write are
removed) and retries failed ones. The batch-level files describe the whole batch, whichever run (and engine) measured
each study, so a batch killed at any moment (even SIGKILL) and run again ends with the same files as one run without
interruption; what this run did is in ``summary.json["this_run"]``. With ``torch.distributed`` (Detectron2
``launch``), rank ``r`` of ``w`` measures the sorted studies ``r, r + w, r + 2w, …``; rank 0 writes the batch-level
files after all ranks are done.
"""
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from bmd_d2 import reports
from bmd_d2.errors import BMDError
from bmd_d2.utils.files import (NIFTI_SUFFIXES, atomic_path, atomic_write_text, sanitize_study_id,
                                study_id_from_path)

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
            found.append(_study_entry(e.path))
        elif e.is_dir():
            found.append(_study_entry(e.path))
    if not found:
        raise BMDError("no studies found (expected study folders or .nii/.nii.gz files)", path=root)
    return sorted(_unique_ids(found))


def _study_entry(path: str) -> Tuple[str, str]:
    """``(study_id, source)`` of one study path: a folder's ``dicom/`` subfolder is its source when there is one."""
    if os.path.isdir(path):
        sub = os.path.join(path, "dicom")
        name = os.path.basename(os.path.normpath(path))
        return sanitize_study_id(name), (sub if os.path.isdir(sub) else path)
    return study_id_from_path(path), path


def _unique_ids(found: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Ids made unique in order, case-insensitively (``a``, ``a-2``, ...): output folders on any file system."""
    seen: Dict[str, int] = {}
    out = []
    for sid, src in found:
        n = seen.get(sid.lower(), 0)
        seen[sid.lower()] = n + 1
        out.append((sid if n == 0 else f"{sid}-{n + 1}", src))
    return out


MANIFEST_COLUMNS = ("path", "study_id")


def read_manifest(path: str) -> List[Tuple[str, str]]:
    """``(study_id, source)`` pairs listed by a manifest CSV, sorted by id (module docstring: the columns).

    A given ``study_id`` is reduced to file-name-safe characters like a folder name; ids derived from paths are made
    unique as in :func:`discover_studies`; blank lines are skipped.

    Raises:
        BMDError: one line naming the file (and the line): unreadable, no ``path`` column, an empty or missing path,
            a path or a given study id listed twice, no study.
    """
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "path" not in header:
                shown = ", ".join(header) if header else "none"
                raise BMDError(f"manifest has no 'path' column (columns: {shown})", path=path)
            reader.fieldnames = header
            rows = []
            for row in reader:
                values = {k: (row.get(k) or "").strip() for k in MANIFEST_COLUMNS}
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                rows.append((reader.line_num, values))
    except OSError as e:
        raise BMDError(f"cannot read manifest: {e.strerror}", path=path) from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise BMDError(f"manifest is not a readable CSV file: {e}", path=path) from None

    given, derived, seen_paths, seen_ids = [], [], {}, {}
    for line, values in rows:
        where = f"{path} line {line}"
        if not values["path"]:
            raise BMDError(f"{where}: empty path")
        src = os.path.normpath(os.path.join(base, os.path.expanduser(values["path"])))
        if not os.path.exists(src):
            raise BMDError(f"{where}: study not found: {values['path']}")
        real = os.path.realpath(src)
        if real in seen_paths:
            raise BMDError(f"{where}: path {values['path']!r} repeats line {seen_paths[real]}")
        seen_paths[real] = line
        sid, source = _study_entry(src)
        if values["study_id"]:
            sid = sanitize_study_id(values["study_id"])
            if sid.lower() in seen_ids:
                raise BMDError(f"{where}: study_id {values['study_id']!r} repeats line {seen_ids[sid.lower()]}")
            seen_ids[sid.lower()] = line
            given.append((sid, source))
        else:
            derived.append((sid, source))
    if not given and not derived:
        raise BMDError("manifest lists no study", path=path)
    # derived ids give way to the given ones: "a" given and "a" derived → the derived one becomes "a-2"
    taken = {sid.lower() for sid, _ in given}
    out = list(given)
    for sid, src in _unique_ids(derived):
        new, n = sid, 1
        while new.lower() in taken:
            n += 1
            new = f"{sid}-{n}"
        taken.add(new.lower())
        out.append((new, src))
    return sorted(out)


def is_manifest(path: str) -> bool:
    """Whether an input path is a manifest (a ``.csv`` file) rather than a study or a folder of studies."""
    return os.path.isfile(path) and path.lower().endswith(".csv")


def find_studies(path: str, exclude: Tuple[str, ...] = ()) -> List[Tuple[str, str]]:
    """The batch's ``(study_id, source)`` pairs: :func:`read_manifest` for a ``.csv`` file, else
    :func:`discover_studies` of the folder."""
    return read_manifest(path) if is_manifest(path) else discover_studies(path, exclude=exclude)


@dataclass
class StudyOutcome:
    """What happened to one study in a batch: ``status`` is "ok", "skipped" (already finished) or "failed"."""

    study_id: str
    source: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    output_warning: bool = False  # measured, but an optional output failed (QC flag output_not_written)
    node: str = ""  # Ray engine: the id of the node that measured it (or last tried)
    crashes: int = 0  # Ray engine: workers that died while measuring it (retried up to --retries times)


def finished_outcome(out_root: str, study_id: str, source: str, requested: Iterable[str]) -> Optional[StudyOutcome]:
    """What is known of a study before measuring it: "skipped" when ``<out_root>/<study_id>`` holds a finished study
    with the ``requested`` optional outputs (:func:`bmd_d2.reports.is_finished_result`; ``result.json`` is read
    once), "failed" when the id would leave the output folder, else None (to be measured)."""
    try:
        out_dir = safe_study_dir(out_root, study_id)
    except BMDError as e:
        return StudyOutcome(study_id, source, "failed", reason=reports.one_line_reason(e))
    done = reports.read_result(out_dir)
    if not reports.is_finished_result(done, list(requested)):
        return None
    warned = "output_not_written" in (done.get("qc_flags") or [])
    return StudyOutcome(study_id, source, "skipped", output_warning=warned)


def measure_study(measure: Callable[[str, str], object], study_id: str, source: str, out_root: str, *,
                  overlay: bool = True, masks: bool = False, dicom: Tuple[str, ...] = ()) -> StudyOutcome:
    """Measure one study and write its reports into ``<out_root>/<study_id>/``; any exception becomes a "failed"
    outcome with its one-line reason (:func:`bmd_d2.reports.one_line_reason`), never a stopped batch.

    Args:
        measure: ``measure(source, study_id) -> StudyResult``.
    """
    t = time.time()
    try:
        out_dir = safe_study_dir(out_root, study_id)
        result = measure(source, study_id)
        reports.write_study(result, out_dir, overlay=overlay, masks=masks, dicom=dicom)
        return StudyOutcome(study_id, source, "ok", seconds=time.time() - t,
                            output_warning="output_not_written" in result.qc_flags)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # isolate every study: one bad input must not stop the batch
        logger.debug("study %s traceback", study_id, exc_info=True)
        return StudyOutcome(study_id, source, "failed", reason=reports.one_line_reason(e), seconds=time.time() - t)


@dataclass
class BatchSummary:
    outcomes: List[StudyOutcome] = field(default_factory=list)
    seconds: float = 0.0
    engine: str = "in-process"  # or "ray"
    workers: int = 1

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def to_dict(self) -> Dict:
        """The batch's state (whichever run measured each study) plus ``this_run``: what this run did."""
        done = [o for o in self.outcomes if o.status in ("ok", "skipped")]
        return {"studies": len(self.outcomes), "measured": len(done),
                "with_output_warnings": sum(o.output_warning for o in done), "failed": self.count("failed"),
                "failures": [{"study_id": o.study_id, "reason": o.reason} for o in self.outcomes
                             if o.status == "failed"],
                "this_run": self._this_run()}

    def _this_run(self) -> Dict:
        run = {"measured": self.count("ok"), "skipped": self.count("skipped"), "failed": self.count("failed"),
               "seconds": round(self.seconds, 3), "engine": self.engine, "workers": self.workers}
        if self.engine == "ray":
            nodes: Dict[str, int] = {}
            for o in self.outcomes:
                if o.status == "ok" and o.node:
                    nodes[o.node] = nodes.get(o.node, 0) + 1
            run["studies_per_node"] = dict(sorted(nodes.items()))
            run["worker_crashes"] = sum(o.crashes for o in self.outcomes)
        return run

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
        skipped = finished_outcome(out_root, sid, src, requested) if resume else None
        outcome = skipped or measure_study(measure, sid, src, out_root, overlay=overlay, masks=masks, dicom=dicom)
        if outcome.status == "failed":
            logger.error("study %s failed: %s", sid, outcome.reason)
        outcomes.append(outcome)
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
    """Write ``studies.csv``, ``all_vertebrae.csv``, ``failures.csv``, ``summary.json`` and the two tables as
    Parquet (``studies.parquet``, ``all_vertebrae.parquet``: :func:`write_parquet_table`), each atomically."""
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
    studies_csv = reports.csv_text(study_rows, reports.STUDY_COLUMNS)
    vertebrae_csv = "\n".join([",".join(reports.VERTEBRA_COLUMNS)] + vert_text) + "\n"
    atomic_write_text(os.path.join(out_root, "studies.csv"), studies_csv)
    atomic_write_text(os.path.join(out_root, "all_vertebrae.csv"), vertebrae_csv)
    write_parquet_table(studies_csv, os.path.join(out_root, "studies.parquet"))
    write_parquet_table(vertebrae_csv, os.path.join(out_root, "all_vertebrae.parquet"))
    fails = [{"study_id": o.study_id, "source": o.source, "reason": o.reason} for o in summary.outcomes
             if o.status == "failed"]
    atomic_write_text(os.path.join(out_root, "failures.csv"), reports.csv_text(fails, ["study_id", "source", "reason"]))
    atomic_write_text(os.path.join(out_root, "summary.json"), json.dumps(summary.to_dict(), indent=2) + "\n")


# Parquet types of the batch tables' numeric columns (reports.STUDY_COLUMNS, reports.VERTEBRA_COLUMNS); every other
# column is a string.
INT_COLUMNS = frozenset({"n_vertebrae", "roi_pixels", "roi_voxels_3d", "genant_grade"})
FLOAT_COLUMNS = frozenset({
    "acr_bmd_mg_cm3", "acr_bmd_classical_mg_cm3", "l1_hu", "score", "bmd_mg_cm3", "learned_bmd_mg_cm3",
    "classical_bmd_mg_cm3", "classical_bmd_3d_mg_cm3", "bmd_difference_mg_cm3", "trabecular_hu", "trabecular_hu_sd",
    "trabecular_hu_3d", "height_anterior_mm", "height_middle_mm", "height_posterior_mm", "height_loss_pct",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "box_x0", "box_y0", "box_x1", "box_y1"})


def typed_rows(csv_text: str) -> Tuple[List[str], List[Dict]]:
    """(columns, rows) of a batch CSV table with :data:`INT_COLUMNS`/:data:`FLOAT_COLUMNS` cells as numbers and
    empty cells as None: what its Parquet twin holds."""
    reader = csv.reader(csv_text.splitlines())
    columns = next(reader, [])
    rows = []
    for cells in reader:
        row = {}
        for c, v in zip(columns, cells):
            if v == "":
                row[c] = None
            elif c in INT_COLUMNS:
                row[c] = int(float(v)) if not v.lstrip("-").isdigit() else int(v)
            elif c in FLOAT_COLUMNS:
                row[c] = float(v)
            else:
                row[c] = v
        rows.append(row)
    return columns, rows


def write_parquet_table(csv_text: str, path: str):
    """The Parquet twin of a batch CSV table (:func:`typed_rows`: int64, float64 and string columns), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns, rows = typed_rows(csv_text)
    kind = {c: pa.int64() if c in INT_COLUMNS else pa.float64() if c in FLOAT_COLUMNS else pa.string()
            for c in columns}
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=kind[c]) for c in columns},
                     schema=pa.schema([(c, kind[c]) for c in columns]))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
