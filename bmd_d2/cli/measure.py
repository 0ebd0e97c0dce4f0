"""``bmd-measure`` / ``tools/measure_bmd.py``: measure vertebral BMD in one CT study or a folder of studies.

    bmd-measure STUDY --config-file CFG --weights model.pth -o out/             # one study: table on stdout
    bmd-measure FOLDER --config-file CFG --weights model.pth -o out/            # many studies: local Ray, resumable
    bmd-measure LIST.csv ...                                                    # a manifest (column path[, study_id])
    bmd-measure FOLDER ... --ray-address HOST:6379                              # on a running Ray cluster
    bmd-measure FOLDER ... --workers 1                                          # in this process, no Ray (debugging)
    bmd-measure FOLDER ... --num-gpus 8                                         # one process per GPU, sharded
    bmd-measure STUDY ... --calibration phantom.json --masks MEASURE.EROSION_MM 2.0

Exit codes (also in ``--help`` and docs/measurement.md):

* 0: every study measured and every requested output written;
* 3: every study measured, but an optional output (DICOM SEG/SR/SC, masks) could not be written for some: the
  measurement and its result.json/vertebrae.csv/overlay are kept, the study carries the QC flag
  ``output_not_written`` and a one-line warning names the output, the source file and the attribute;
* 1: a batch finished but some studies failed (listed in ``<out>/failures.csv``; the others are measured);
* 2: a user error (bad arguments, config, weights, or the single study cannot be read), one ``error:`` line.
"""
import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from bmd_d2.errors import BMDError
from bmd_d2.utils.logs import redact, setup_cli_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bmd-measure",
        description="Measure vertebral BMD (learned and classical) in CT studies; writes JSON, CSV and overlay PNG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. MEASURE.SCORE_THRESHOLD 0.7.\n\n"
               "exit codes:\n"
               "  0  measured, every requested output written\n"
               "  3  measured, but an optional output (DICOM SEG/SR/SC, masks) failed for some study: the\n"
               "     measurement is kept (QC flag output_not_written, one warning line per output)\n"
               "  1  batch finished, some studies failed (see <out>/failures.csv)\n"
               "  2  user error (arguments, config, weights, unreadable single study): one 'error:' line")
    p.add_argument("input", help="a study (DICOM folder/file, .nii/.nii.gz), a folder of studies, or a manifest .csv "
                                 "(column path, optional study_id; relative paths from the manifest's folder)")
    p.add_argument("-o", "--output", default="bmd_output", help="output folder (default: %(default)s)")
    p.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    p.add_argument("--weights", metavar="FILE", help="trained weights (sets MODEL.WEIGHTS)")
    p.add_argument("--calibration", metavar="JSON", help="phantom calibration file (sets MEASURE.CALIBRATION_FILE)")
    p.add_argument("--internal-reference", action="store_true",
                   help="correct the HU scale with the scan's air and fat (MEASURE.INTERNAL_REFERENCE)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (sets MODEL.DEVICE)")
    p.add_argument("--masks", action="store_true", help="also write masks.nii.gz (labels in the source geometry)")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    dcm = p.add_argument_group("DICOM outputs (DICOM input only; docs/dicom_outputs.md)")
    dcm.add_argument("--dicom-seg", action="store_true", help="write segmentation.dcm (DICOM SEG of the vertebrae)")
    dcm.add_argument("--dicom-sr", action="store_true", help="write report_sr.dcm (TID 1500 structured report)")
    dcm.add_argument("--dicom-sc", action="store_true", help="write overlay_sc.dcm (secondary capture of the overlay)")
    dcm.add_argument("--dicom-outputs", action="store_true", help="all three DICOM objects")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batch", action="store_true", help="treat the input as a folder of studies (or a manifest)")
    mode.add_argument("--single", action="store_true", help="treat the input as one study")
    p.add_argument("--no-resume", action="store_true", help="batch: re-measure studies already finished")
    p.add_argument("--hash-ids", action="store_true",
                   help="name outputs by a hash of the source path instead of folder/file names")
    p.add_argument("--json", action="store_true", help="single study: print the JSON result instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr, no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also the libraries' INFO messages (highdicom, pydicom, ...); -vv: DEBUG. Patient data "
                        "(names, IDs, dates) never appears in the log at any level")
    eng = p.add_argument_group("batch engine (docs/measurement.md: Batches)")
    eng.add_argument("--workers", type=_positive_int, metavar="N",
                     help="parallel workers: Ray actors, each loading the model once (default: the CPU cores, or the "
                          "cluster's, divided by --cpus-per-worker); 1 = in this process without Ray (debugging)")
    eng.add_argument("--ray-address", metavar="ADDR", help="run on this Ray cluster (e.g. head-node:6379 or auto) "
                     "instead of a local Ray instance; inputs and -o must be on storage every node sees")
    eng.add_argument("--cpus-per-worker", type=_positive_int, default=1, metavar="N",
                     help="CPUs (torch threads, OMP_NUM_THREADS) of each worker (default: %(default)s)")
    eng.add_argument("--retries", type=_non_negative_int, default=2, metavar="N",
                     help="a study whose worker died (crash, OOM kill, timeout) is measured again up to N times, "
                          "then reported as failed (default: %(default)s)")
    eng.add_argument("--study-timeout", type=_positive_float, metavar="SEC",
                     help="kill a worker whose study takes longer (counts as a crash; default: no limit)")
    p.add_argument("--num-gpus", type=int, default=0,
                   help="multi-GPU sharding: one process per GPU (Detectron2 launch, static shards, no Ray)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="torch.distributed init URL (multi-machine)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. MEASURE.EROSION_MM 2.0")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def setup_cfg(args):
    """Config from the arguments; CUDA falls back to CPU.

    Raises:
        BMDError: a bad config file, key, value (``validate_measure_config``: every MEASURE key, the calibration
            file must exist and be readable) or weights path. A calibration file that cannot be parsed is refused
            by ``BMDStudyPredictor``, which reads it once, before any study is measured.
    """
    from bmd_d2.config import available_device, get_bmd_cfg

    opts = list(args.opts or [])
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    if args.calibration:
        opts += ["MEASURE.CALIBRATION_FILE", args.calibration]
    if args.internal_reference:
        opts += ["MEASURE.INTERNAL_REFERENCE", "True"]
    if args.device:
        opts += ["MODEL.DEVICE", args.device]
    cfg = get_bmd_cfg(args.config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE)
    cfg.freeze()
    return cfg


def dicom_kinds(args) -> tuple:
    """The DICOM objects requested: subset of ("seg", "sr", "sc")."""
    return tuple(k for k in ("seg", "sr", "sc") if args.dicom_outputs or getattr(args, f"dicom_{k}"))


def _hash_id(source: str) -> str:
    from bmd_d2.utils.files import short_hash

    return "s" + short_hash(os.path.realpath(source))


def _local_workers(args) -> int:
    """``--workers``, by default the CPU cores // ``--cpus-per-worker`` (at least 1)."""
    from bmd_d2.utils.threads import usable_cores

    return args.workers or max(1, usable_cores() // args.cpus_per_worker)


def worker(args) -> int:
    """Run in every process (one per GPU under ``launch``): measure one study, or the batch (this rank's share, in
    this process with ``--workers 1`` or under ``launch``; on Ray otherwise)."""
    from detectron2.utils import comm

    from bmd_d2 import reports
    from bmd_d2.engine.batch import find_studies, is_manifest, looks_like_single_study, run_batch, safe_study_dir
    from bmd_d2.measure.predictor import BMDStudyPredictor
    from bmd_d2.utils.files import sanitize_study_id, study_id_from_path

    setup_cli_logging(quiet=args.quiet, verbosity=args.verbose, rank=comm.get_rank())
    cfg = setup_cfg(args)
    if not os.path.exists(args.input):
        raise BMDError("input not found", path=args.input)
    single = args.single or (not args.batch and not is_manifest(args.input) and looks_like_single_study(args.input))
    in_process = single or comm.get_world_size() > 1 or (not args.ray_address and _local_workers(args) == 1)
    predictor = BMDStudyPredictor(cfg) if in_process else None
    os.makedirs(args.output, exist_ok=True)

    if single:
        if not comm.is_main_process():
            return 0
        sid = _hash_id(args.input) if args.hash_ids else study_id_from_path(args.input)
        result = predictor(args.input, study_id=sanitize_study_id(sid))
        paths = reports.write_study(result, safe_study_dir(args.output, result.study_id),
                                   overlay=not args.no_overlay, masks=args.masks, dicom=dicom_kinds(args))
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
        else:
            print(reports.format_table(result))
            print(f"reports: {os.path.dirname(paths['json'])}")
        return 3 if "output_not_written" in result.qc_flags else 0

    studies = find_studies(args.input, exclude=(args.output,))
    if args.hash_ids:
        studies = sorted((_hash_id(src), src) for _, src in studies)
    logger.info("%d studies found", len(studies))
    if in_process:
        summary = run_batch(lambda src, sid: predictor(src, study_id=sid), studies, args.output,
                            overlay=not args.no_overlay, masks=args.masks, dicom=dicom_kinds(args),
                            resume=not args.no_resume, progress=not args.quiet)
    else:
        from bmd_d2.engine.ray_batch import run_ray_batch

        summary = run_ray_batch(cfg, studies, args.output,
                                workers=args.workers if args.ray_address else _local_workers(args),
                                cpus_per_worker=args.cpus_per_worker, address=args.ray_address, retries=args.retries,
                                study_timeout=args.study_timeout, overlay=not args.no_overlay, masks=args.masks,
                                dicom=dicom_kinds(args), resume=not args.no_resume, progress=not args.quiet,
                                quiet=args.quiet, verbosity=args.verbose)
    if comm.is_main_process():
        print(summary.text())
        for o in summary.outcomes:
            if o.status == "failed":
                print(f"  failed {o.study_id}: {o.reason}")
        print(f"reports: {args.output} (studies.csv, all_vertebrae.csv, failures.csv, summary.json)")
        if summary.count("failed"):
            return 1
        return 3 if summary.to_dict()["with_output_warnings"] else 0
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``bmd-measure``); returns/exits with the code in the module docstring."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        world = args.num_gpus * args.num_machines
        if world > 1:
            from detectron2.engine import launch

            launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
            code = 0
        else:
            code = worker(args)
    except BMDError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        code = 2
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
