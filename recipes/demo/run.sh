#!/usr/bin/env bash
# The main demo: why Admin exists, in a few minutes on a CPU.
#
# Trains, with the real fairseq-train, three deep (12L-12L by default) encoder-decoder transformers
# on a toy translation task this script generates itself (no download):
#   postln  fairseq's stock Post-LN transformer          --arch transformer
#   admin   the same network with Admin's omega shortcut --arch transformer_admin --admin-init admin
#   preln   fairseq's stock Pre-LN transformer           --arch transformer --*-normalize-before
# with the same aggressive schedule (lr 2e-3 after 100 warmup updates, no gradient clipping), then
# prints a table (final losses, whether each diverged or stalled) and writes a PNG of the curves.
# At this depth and learning rate plain Post-LN stalls near the uniform-guess loss (its early
# updates are amplified through the deep residual stack), while Admin trains like Pre-LN.
#
# Usage: recipes/demo/run.sh [--quick] [--out DIR] [--updates N] [--layers N] [--lr LR] [--force]
#   --quick      small run (~2 minutes on 2 cores): d=32, 150 updates on 1000 sentences; Post-LN
#                stays on its plateau while Admin and Pre-LN start learning (~0.3 bits lower); for tests
#   --out DIR    where data, runs and results go (default: <repo>/demo-output)
#   --updates N  training updates per model;  --layers N  encoder and decoder layers each
#   --lr LR      peak learning rate;           --force     retrain even if a finished run exists
#   --jobs N     train N models at once (default 3: all; each run is single-threaded)
# Re-running reuses the generated data and every finished run (delete DIR/<config>/runs/<model> to redo one).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

OUT="$REPO_DIR/demo-output" QUICK=0 FORCE=0 JOBS=3
LAYERS=12 DIM=64 UPDATES=300 LR=2e-3 WARMUP=100 TRAIN=4000 VOCAB=64 MAX_TOKENS=1000
MODELS=(postln admin preln)
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --quick) QUICK=1; LAYERS=12 DIM=32 UPDATES=150 TRAIN=1000 WARMUP=20; shift ;;
    --out) OUT=$2; shift 2 ;;
    --updates) UPDATES=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$UPDATES" =~ ^[0-9]+$ && "$UPDATES" -gt 0 ]] || die "--updates must be a positive integer (got '$UPDATES')"
[[ "$JOBS" =~ ^[0-9]+$ && "$JOBS" -gt 0 ]] || die "--jobs must be a positive integer (got '$JOBS')"
[[ "$LAYERS" =~ ^[0-9]+$ && "$LAYERS" -gt 0 ]] || die "--layers must be a positive integer (got '$LAYERS')"
need_tools fairseq-train fairseq-preprocess "$PYTHON"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONUNBUFFERED=1

CONFIG="L${LAYERS}-d${DIM}-lr${LR}-wu${WARMUP}-u${UPDATES}-n${TRAIN}"
DATA="$OUT/data-n${TRAIN}-v${VOCAB}" RUNS="$OUT/$CONFIG/runs"
START=$SECONDS
log "demo: ${LAYERS}L-${LAYERS}L transformer, d=$DIM, lr $LR, warmup $WARMUP, $UPDATES updates per model -> $OUT/$CONFIG"

# 1. data (generated, then binarized with a joined dictionary)
if [[ ! -s "$DATA/bin/dict.src.txt" ]]; then
  log "generate the toy corpus ($TRAIN training sentences) and binarize it"
  rm -rf "$DATA"
  "$PYTHON" "$RECIPES_DIR/demo/make_data.py" --out "$DATA/raw" --train "$TRAIN" --vocab "$VOCAB"
  fairseq-preprocess --source-lang src --target-lang tgt --trainpref "$DATA/raw/train" \
    --validpref "$DATA/raw/valid" --destdir "$DATA/bin" --joined-dictionary --workers 1 \
    > "$DATA/preprocess.log" 2>&1 || { tail -n 20 "$DATA/preprocess.log"; die "fairseq-preprocess failed"; }
else
  log "reuse data in $DATA"
fi

# 2. one training run per model; a run is finished when its exit_code file exists
train_one() {  # train_one MODEL: one fairseq-train run, progress on stdout, exit code in DIR/exit_code
  local model=$1 dir="$RUNS/$1" code
  rm -rf "$dir"; mkdir -p "$dir"
  # --save-dir of its own even with --no-save: fairseq-train writes and removes <save-dir>/dummy at start, and the
  # parallel runs raced on ./checkpoints/dummy (one of them failed with FileNotFoundError)
  # shellcheck disable=SC2046
  set +e
  fairseq-train "$DATA/bin" --user-dir "$USER_DIR" $(model_flags "$model" "$dir") \
    --encoder-layers "$LAYERS" --decoder-layers "$LAYERS" \
    --encoder-embed-dim "$DIM" --decoder-embed-dim "$DIM" \
    --encoder-ffn-embed-dim $((2 * DIM)) --decoder-ffn-embed-dim $((2 * DIM)) \
    --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings \
    --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0 \
    --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --warmup-init-lr 1e-7 \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --dropout 0.1 \
    --max-tokens "$MAX_TOKENS" --max-update "$UPDATES" --seed 1 --cpu --num-workers 0 \
    --disable-validation --no-save --save-dir "$dir/checkpoints" --no-progress-bar --log-format json --log-interval 10 \
    2>&1 | tee "$dir/train.log" | "$PYTHON" "$RECIPES_DIR/demo/progress.py" "$model" "$UPDATES"
  code=${PIPESTATUS[0]}
  set -e
  echo "$code" > "$dir/exit_code"
  [[ $code -eq 0 ]] || log "$model: fairseq-train exited $code (counted as diverged; log: $dir/train.log)"
  log "$model: finished"
}

# the runs are independent single-threaded processes: run --jobs of them at once
running=0
for model in "${MODELS[@]}"; do
  if [[ $FORCE -eq 0 && -f "$RUNS/$model/exit_code" ]]; then
    log "$model: reuse finished run in $RUNS/$model"; continue
  fi
  if [[ $running -ge $JOBS ]]; then wait -n || true; running=$((running - 1)); fi
  log "$model: training ($UPDATES updates)"
  train_one "$model" &
  running=$((running + 1))
done
wait

# 3. table and curves
"$PYTHON" "$RECIPES_DIR/demo/report.py" --runs "$RUNS" --models "${MODELS[@]}" --vocab "$VOCAB" \
  --title "${LAYERS}L-${LAYERS}L transformer (d=$DIM), lr $LR, warmup $WARMUP, no clipping, toy reversal translation" \
  --out "$OUT/$CONFIG"
log "demo finished in $((SECONDS - START)) s"
