#!/usr/bin/env python
"""Export a training checkpoint as a compact shipped model (fp16 state dict + the config it was trained with).

    python tools/export_model.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml \
        --checkpoint output/default_model/model_final.pth --output models/bmd_rcnn_MFEFPN_R18_cpu.pth
"""
import argparse
import sys

import bmd_d2  # noqa: F401
from bmd_d2 import BMDError
from bmd_d2.checkpoint import export_model
from bmd_d2.config import get_bmd_cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--fp32", action="store_true", help="keep fp32 tensors (default: fp16)")
    p.add_argument("--info", nargs="*", default=[], metavar="KEY=VALUE", help="metadata stored with the weights")
    p.add_argument("opts", nargs="*", help="config overrides used in training (KEY VALUE ...)")
    args = p.parse_args(argv)
    try:
        cfg = get_bmd_cfg(args.config_file, args.opts)
        info = dict(kv.split("=", 1) for kv in args.info)
        out = export_model(args.checkpoint, cfg, args.output, half=not args.fp32, info=info)
    except (BMDError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
