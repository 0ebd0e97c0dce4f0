#!/usr/bin/env bash
# README command 1: sets up the environment if needed (tools/bootstrap.sh), then measures the bundled example CT
# with the shipped default model and prints the per-vertebra report. Extra arguments go to tools/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec "${BMD_VENV:-$ROOT/.venv}/bin/python" tools/demo.py "$@"
