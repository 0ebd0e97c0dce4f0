#!/usr/bin/env bash
# README command 2: sets up the environment if needed (tools/bootstrap.sh), then runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k mapper`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"  # tests are CPU tests
set +e
"${BMD_VENV:-$ROOT/.venv}/bin/python" -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi
exit "$rc"
