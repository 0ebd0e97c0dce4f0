"""Command-line entry points (the top layer): ``bmd-measure`` (:mod:`bmd_d2.cli.measure`)."""
