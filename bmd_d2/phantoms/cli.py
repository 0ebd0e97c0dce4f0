"""``bmd-make-phantoms``: write a dataset of synthetic lumbar-spine CT studies with known BMD.

    bmd-make-phantoms --name bmd_phantoms_train -n 200 --seed 0
    bmd-make-phantoms --out /tmp/ph -n 4 --tiny --no-prepare
    bmd-make-phantoms --name bmd_phantoms_val -n 40 --seed 1 --transfer-syntax j2k --matrix 512

Writes ``<root>/<name>/studies/<study_id>/{dicom/, labels.nii.gz, cores.nii.gz, phantom.json, preview.png}`` and
``bmd.csv``; then, unless ``--no-prepare``, calls ``bmd_d2.data.datasets.prepare_sagittal_dataset`` (when that module
is importable) to build ``sagittal/`` and ``annotations.json``. The root defaults to ``$BMD_DATASETS`` or
``./datasets``. Errors are printed as ``error: <message>`` with exit code 2.
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from bmd_d2.errors import BMDError, one_line

from .dataset import generate_dataset
from .options import (CONTRAST_PHASES, GENERATOR_VERSION, GENERATOR_VERSIONS, LUMBAR_VERTEBRAE, RIB_PAIRS,
                      TRANSFER_SYNTAXES, PhantomOptions)

logger = logging.getLogger(__name__)


def _bool(s: str) -> bool:
    """``argparse`` type of the true/false flags."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``bmd-make-phantoms`` (every :class:`PhantomOptions` field is reachable)."""
    ap = argparse.ArgumentParser(prog="bmd-make-phantoms", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num", type=int, default=10, help="number of studies (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; study i uses study_seed(seed, i)")
    ap.add_argument("--start", type=int, default=0, help="index of the first study (to extend a dataset)")
    ap.add_argument("--name", default="bmd_phantoms_train", help="dataset folder name under the root")
    ap.add_argument("--root", default=None, help="datasets root (default $BMD_DATASETS or ./datasets)")
    ap.add_argument("--out", default=None, help="dataset folder (overrides --root/--name)")
    ap.add_argument("--tiny", action="store_true", help="small fast studies (96² of 2 mm, 3 mm slices)")
    ap.add_argument("--no-prepare", action="store_true", help="do not build sagittal/ and annotations.json")
    ap.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    g = ap.add_argument_group("image (default: drawn at random per study)")
    g.add_argument("--matrix", type=int, default=None, help="rows = columns (default 512, 96 with --tiny)")
    g.add_argument("--pixel-spacing", type=float, default=None, help="mm (random 0.5–0.98)")
    g.add_argument("--slice-thickness", type=float, default=None, help="mm (random 0.625–3)")
    g.add_argument("--slice-spacing", type=float, default=None, help="mm between slices")
    g.add_argument("--max-slices", type=int, default=None, help="cap on slices (default 400)")
    g.add_argument("--noise-sd", type=float, default=None, help="HU; 0 disables noise")
    g.add_argument("--psf-sigma", type=float, default=None, help="mm; 0 disables blur")
    g.add_argument("--bmd", type=float, default=None, help="patient mean BMD mg/cm³ (random 30–250)")
    for flag in ("contrast", "table", "fracture", "metal"):
        g.add_argument(f"--{flag}", type=_bool, default=None, metavar="BOOL", help="force true/false (default random)")
    g.add_argument("--no-scoliosis", action="store_true", help="straight coronal alignment, no axial rotation")
    g.add_argument("--generator-version", type=int, choices=GENERATOR_VERSIONS, default=None,
                   help=f"phantom generator (default {GENERATOR_VERSION}; 4 = before the X-ray physics; 6 = v5 with "
                        "sacroiliac joints and transitional anatomy; 7 = v6 with the patient's bone texture kept by "
                        "a re-scan)")
    g.add_argument("--kvp", type=float, default=None, help="tube potential kV, v5 (random 80–140)")
    g.add_argument("--age", type=int, default=None, help="patient age in years, v5 (random 20–90)")
    g.add_argument("--marrow-fat", type=float, default=None, help="marrow fat fraction 0–0.95, v5 (random by age)")
    g.add_argument("--contrast-phase", choices=CONTRAST_PHASES, default=None, help="v5 (random)")
    g.add_argument("--rib-pairs", type=int, choices=RIB_PAIRS, default=None,
                   help="rib-bearing vertebrae, v6 (random: 11 or 13 on 6 %% each)")
    g.add_argument("--lumbar-vertebrae", type=int, choices=LUMBAR_VERTEBRAE, default=None,
                   help="4 = sacralised L5, 6 = lumbarised S1, v6 (random: 5 %% each)")
    d = ap.add_argument_group("DICOM encoding (default: drawn at random per study)")
    d.add_argument("--storage", choices=("signed", "unsigned"), default=None)
    d.add_argument("--rescale", type=float, nargs=2, metavar=("SLOPE", "INTERCEPT"), default=None)
    d.add_argument("--bits-stored", type=int, choices=(12, 16), default=None)
    d.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default=None)
    for flag in ("shuffle-names", "reverse-instances", "fov-padding", "optional-tags"):
        d.add_argument(f"--{flag}", type=_bool, default=None, metavar="BOOL")
    return ap


def options_from_args(args: argparse.Namespace) -> PhantomOptions:
    """:class:`PhantomOptions` from parsed arguments (unset arguments keep the preset's value)."""
    over = dict(
        matrix=args.matrix, pixel_spacing=args.pixel_spacing, slice_thickness=args.slice_thickness,
        slice_spacing=args.slice_spacing, max_slices=args.max_slices, noise_sd=args.noise_sd,
        psf_sigma_mm=args.psf_sigma, bmd_mg_cm3=args.bmd, contrast=args.contrast, table=args.table,
        fracture=args.fracture, metal=args.metal, storage=args.storage,
        rescale=tuple(args.rescale) if args.rescale else None, bits_stored=args.bits_stored,
        transfer_syntax=args.transfer_syntax, shuffle_names=args.shuffle_names,
        reverse_instances=args.reverse_instances, fov_padding=args.fov_padding, optional_tags=args.optional_tags,
        generator_version=args.generator_version, kvp=args.kvp, age=args.age, marrow_fat_fraction=args.marrow_fat,
        contrast_phase=args.contrast_phase, rib_pairs=args.rib_pairs, lumbar_vertebrae=args.lumbar_vertebrae,
    )
    over = {k: v for k, v in over.items() if v is not None}
    if args.no_scoliosis:
        over["scoliosis"] = False
    if args.no_preview:
        over["preview"] = False
    opts = PhantomOptions.tiny(**over) if args.tiny else PhantomOptions(**over)
    opts.validate()
    return opts


def dataset_dir(args: argparse.Namespace) -> Path:
    """The dataset folder: ``--out``, else ``<--root | $BMD_DATASETS | datasets>/<--name>``."""
    if args.out:
        return Path(args.out)
    return Path(args.root or os.environ.get("BMD_DATASETS", "datasets")) / args.name


def _prepare(root: Path) -> bool:
    """Build sagittal images + COCO json through the dataset module when it is importable."""
    try:
        from bmd_d2.data.datasets import prepare_sagittal_dataset
    except ImportError as e:  # the dataset module (or detectron2) is not available: studies alone are still useful
        logger.warning("sagittal preparation skipped (bmd_d2.data.datasets not importable: %s)", e)
        return False
    prepare_sagittal_dataset(root)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad arguments or input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one "tile number 1 / 1" line per JPEG 2000 slice
    args = build_parser().parse_args(argv)
    try:
        if args.num < 0:
            raise ValueError("--num must be >= 0")
        opts = options_from_args(args)
        root = dataset_dir(args)
        ids = generate_dataset(root, args.num, seed=args.seed, options=opts, start=args.start,
                               progress=not args.quiet)
        logger.info("wrote %d studies to %s", len(ids), root / "studies")
        if not args.no_prepare and _prepare(root):
            logger.info("prepared %s", root / "annotations.json")
    except (ValueError, OSError, BMDError) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
