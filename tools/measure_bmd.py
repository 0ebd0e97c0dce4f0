#!/usr/bin/env python
"""Measure vertebral BMD in CT studies: a thin wrapper of ``bmd-measure`` (``bmd_d2.cli.measure``).

    python tools/measure_bmd.py STUDY_OR_FOLDER --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml \
        --weights output/model_final.pth -o bmd_output

See ``python tools/measure_bmd.py -h`` and docs/measurement.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bmd_d2.cli.measure import main  # noqa: E402

if __name__ == "__main__":
    main()
