#!/usr/bin/env python
"""Write synthetic lumbar-spine CT phantoms with known BMD (same as the ``bmd-make-phantoms`` command).

    python tools/make_phantoms.py --name bmd_phantoms_train -n 200 --seed 0
"""
import sys

from bmd_d2.phantoms.cli import main

if __name__ == "__main__":
    sys.exit(main())
