#!/usr/bin/env bash
# README command 2: sets up the environment if needed (tools/bootstrap.sh), then runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k mapper`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"  # tests are CPU tests
# The DICOM output tests validate with dciodvfy (dicom3tools); the DICOM node tests (bmd-serve) use dcmtk's
# storescu/echoscu and a real PACS, Orthanc. As root (CI containers) install the three Debian packages when any is
# missing; otherwise nothing (without them those tests skip with the reason, unless CI is set: then they fail).
if [ "$(id -u)" -eq 0 ] && { ! command -v dciodvfy >/dev/null 2>&1 || ! command -v storescu >/dev/null 2>&1 \
        || ! [ -x /usr/sbin/Orthanc ]; } && command -v apt-get >/dev/null 2>&1; then
    log="${TMPDIR:-/tmp}/bmd_d2_apt_dicom_tools.log"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            dicom3tools dcmtk orthanc; } >"$log" 2>&1; then
        echo "warning: could not install dicom3tools/dcmtk/orthanc (see $log); those tests skip" >&2
    fi
fi
set +e
"${BMD_VENV:-$ROOT/.venv}/bin/python" -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi
exit "$rc"
