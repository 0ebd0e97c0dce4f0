#!/usr/bin/env bash
# Train the small CPU model (configs/bmd_rcnn_MFEFPN_R18_cpu.yaml) on generated phantoms, end to end. Resumable: each
# step skips what is already done (phantoms already written, training resumes from its last checkpoint).
#   bash tools/train_default_model.sh            # all steps
#   ITERS=3000 bash tools/train_default_model.sh # override SOLVER.MAX_ITER (the LR steps scale with it)
# The export goes to $OUT/export/; copying it to models/bmd_rcnn_MFEFPN_R18_cpu.pth makes it the default model.
# The shipped default was made by this script as of commit 0ad8cc4 (phantom generator v1, ITERS=2000, 1000-iteration
# checkpoint); with the current generator (v2) it trains the model README "Model zoo" compares with it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/bootstrap.sh
PY="${BMD_VENV:-$ROOT/.venv}/bin/python"
export BMD_DATASETS="${BMD_DATASETS:-$ROOT/datasets}"
OUT="${OUT:-output/default_model}"
ITERS="${ITERS:-1500}"

# 1. Data: 200 training + 30 validation phantom studies (seeds 1000 / 2000; test seeds 9000+ stay unseen).
gen() {  # name seed n
  local have
  have=$(ls "$BMD_DATASETS/$1/studies" 2>/dev/null | wc -l)
  if [ "$have" -lt "$3" ]; then
    "$PY" tools/make_phantoms.py -n $(( $3 - have )) --start "$have" --seed "$2" --name "$1" --no-preview --no-prepare
  fi
  "$PY" -c "from bmd_d2.data.datasets import prepare_sagittal_dataset as p; p('$BMD_DATASETS/$1', skip_errors=True, workers=2)"
}
gen bmd_phantoms_train 1000 200
gen bmd_phantoms_val 2000 30

# 2. Train (seeded; resumes from $OUT/last_checkpoint).
S1=$(( ITERS * 7 / 10 )); S2=$(( ITERS * 9 / 10 ))
"$PY" tools/train_net.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml --resume \
  SEED 42 OUTPUT_DIR "$OUT" SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($S1, $S2)" SOLVER.CHECKPOINT_PERIOD 250 \
  TEST.EVAL_PERIOD 0

# 3. Export the final weights (fp16 + the training config).
"$PY" tools/export_model.py --config-file configs/bmd_rcnn_MFEFPN_R18_cpu.yaml --checkpoint "$OUT/model_final.pth" \
  --output "$OUT/export/bmd_rcnn_MFEFPN_R18_cpu.pth" --info "iterations=$ITERS" \
  "data=phantoms (generator v2) train seed 1000 x200"
