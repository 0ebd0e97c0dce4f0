"""``bmd-measure`` / ``tools/measure_bmd.py``: measure vertebral BMD in one CT study or a folder of studies.

    bmd-measure STUDY --config-file CFG --weights model.pth -o out/             # one study: table on stdout
    bmd-measure FOLDER --config-file CFG --weights model.pth -o out/            # many studies (batch, resumable)
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
    p.add_argument("input", help="a study (DICOM folder/file, .nii/.nii.gz) or a folder of studies")
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
    mode.add_argument("--batch", action="store_true", help="treat the input as a folder of studies")
    mode.add_argument("--single", action="store_true", help="treat the input as one study")
    p.add_argument("--no-resume", action="store_true", help="batch: re-measure studies already finished")
    p.add_argument("--hash-ids", action="store_true",
                   help="name outputs by a hash of the source path instead of folder/file names")
    p.add_argument("--json", action="store_true", help="single study: print the JSON result instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr, no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also the libraries' INFO messages (highdicom, pydicom, ...); -vv: DEBUG. Patient data "
                        "(names, IDs, dates) never appears in the log at any level")
    p.add_argument("--num-gpus", type=int, default=0, help="processes (GPUs) per machine for a batch")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="torch.distributed init URL (multi-machine)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. MEASURE.EROSION_MM 2.0")
    return p


def setup_cfg(args):
    """Config from the arguments; CUDA falls back to CPU.

    Raises:
        BMDError: a bad config file, key, value (``validate_measure_config``: every MEASURE key, the calibration
            file must exist and be readable) or weights path. A calibration file that cannot be parsed is refused
            by ``BMDStudyPredictor``, which reads it once, before any study is measured.
    """
    import torch

    from bmd_d2.config import get_bmd_cfg

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
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def dicom_kinds(args) -> tuple:
    """The DICOM objects requested: subset of ("seg", "sr", "sc")."""
    return tuple(k for k in ("seg", "sr", "sc") if args.dicom_outputs or getattr(args, f"dicom_{k}"))


def _hash_id(source: str) -> str:
    import hashlib

    return "s" + hashlib.sha1(os.path.realpath(source).encode()).hexdigest()[:12]


def worker(args) -> int:
    """Run in every process (one per GPU under ``launch``): measure this rank's studies."""
    from detectron2.utils import comm

    from bmd_d2 import reports
    from bmd_d2.engine.batch import discover_studies, looks_like_single_study, run_batch, safe_study_dir
    from bmd_d2.measure.predictor import BMDStudyPredictor
    from bmd_d2.utils.files import sanitize_study_id, study_id_from_path

    setup_cli_logging(quiet=args.quiet, verbosity=args.verbose, rank=comm.get_rank())
    cfg = setup_cfg(args)
    single = args.single or (not args.batch and looks_like_single_study(args.input))
    if not os.path.exists(args.input):
        raise BMDError("input not found", path=args.input)
    predictor = BMDStudyPredictor(cfg)
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

    studies = discover_studies(args.input, exclude=(args.output,))
    if args.hash_ids:
        studies = sorted((_hash_id(src), src) for _, src in studies)
    logger.info("%d studies found", len(studies))
    summary = run_batch(lambda src, sid: predictor(src, study_id=sid), studies, args.output,
                        overlay=not args.no_overlay, masks=args.masks, dicom=dicom_kinds(args),
                        resume=not args.no_resume,
                        progress=not args.quiet)
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
