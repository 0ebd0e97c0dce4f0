#!/usr/bin/env bash
# Creates (or checks) the project's virtual environment: torch + torchvision, Detectron2, bmd_d2 and its dependencies.
# Idempotent: a stamp file keyed on this script and setup.py makes a second run take well under a second.
# Uses only the package registries. Environment:
#   BMD_VENV     venv folder (default: <repo>/.venv)
#   BMD_PYTHON   interpreter that creates the venv (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BMD_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
KEY="$(cat "$ROOT/tools/bootstrap.sh" "$ROOT/setup.py" "$ROOT/tools/detectron2_C_fallback.py" | sha1sum | cut -c1-12)"
STAMP="$VENV/.bmd_d2_bootstrap_$KEY"
[ -f "$STAMP" ] && exit 0

log() { echo "[bootstrap] $*" >&2; }
t0=$(date +%s)
if [ ! -x "$PY" ]; then
  log "creating virtual environment in $VENV"
  "${BMD_PYTHON:-python3}" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "pip<26" wheel "setuptools<81"

# torch/torchvision: the versions that load together here (see README). A user's own build is kept.
# They are CUDA builds (they run on the CPU too): ~3 GB of wheels when pip downloads them, ~5.5 GB installed.
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch 2.14.1 + torchvision 0.29.1 (a few minutes on a fresh machine)"
  tmpdir="${TMPDIR:-/tmp}"
  venv_free="$(free_gb "$VENV")"; tmp_free="$(free_gb "$tmpdir")"
  if [ -n "$venv_free" ] && [ -n "$tmp_free" ] && awk -v a="$venv_free" -v b="$tmp_free" 'BEGIN { exit !(a < 9 || b < 3.5) }'; then
    log "warning: torch needs ~5.5 GB in $VENV (${venv_free} GB free there) and ~3 GB of downloads in $tmpdir" \
        "(${tmp_free} GB free there); the install may run out of space"
  fi
  # --no-cache-dir: do not keep a second copy of the downloaded wheels in pip's cache
  if ! "${PIP[@]}" install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"; then
    echo "bootstrap: error: pip could not install torch 2.14.1 + torchvision 0.29.1 into $VENV (see pip's message" \
         "above; free space now: $(free_gb "$VENV") GB there, $(free_gb "$tmpdir") GB in $tmpdir)" >&2
    exit 1
  fi
fi

# Detectron2: keep an importable one (e.g. a CUDA build from source); else install v0.6's pure-Python package.
if "$PY" -c "import detectron2" 2>/dev/null; then
  log "using the installed Detectron2: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
  # our own pure-Python install: keep its _C stand-in current
  fallback="$("$PY" -c 'import detectron2._C as C; print(C.__file__ if getattr(C, "IS_BMD_D2_FALLBACK", False) else "")' 2>/dev/null || true)"
  [ -n "$fallback" ] && cp "$ROOT/tools/detectron2_C_fallback.py" "$fallback"
else
  log "installing Detectron2 v0.6 (pure Python, from the registry sdist pb1-detectron2==0.6)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # --no-build-isolation: pip runs the sdist's setup.py for metadata, which imports torch.
  "${PIP[@]}" download --no-deps --no-build-isolation -d "$tmp" "pb1-detectron2==0.6"
  tar -xzf "$tmp"/pb1-detectron2-0.6.tar.gz -C "$tmp"
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -rf "$site/detectron2"
  cp -r "$tmp/pb1-detectron2-0.6/detectron2" "$site/detectron2"
  cp "$ROOT/tools/detectron2_C_fallback.py" "$site/detectron2/_C.py"
  # v0.6's runtime requirements (its setup.py), with the pins it needs on current Python/numpy.
  "${PIP[@]}" install "Pillow>=7.1,<10" matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" "yacs>=0.1.8" tabulate \
    cloudpickle "tqdm>4.29.0" tensorboard "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "omegaconf>=2.1" \
    "hydra-core>=1.1" opencv-python-headless
fi

log "installing bmd_d2 (editable) and its dependencies"
"${PIP[@]}" install -e "$ROOT[test]"
"$PY" -c "import bmd_d2, detectron2; print('[bootstrap] bmd_d2 on detectron2', detectron2.__version__)" >&2
rm -f "$VENV"/.bmd_d2_bootstrap_*
touch "$STAMP"
log "done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)"
