#!/usr/bin/env bash
# Train one model on prepared Multi30k (recipes/multi30k/prepare.sh) on a CPU or GPUs.
#
# Usage: recipes/multi30k/train.sh --model MODEL [--layers E-D] [--data DIR] [--save DIR]
#                                  [--gpus N] [--max-update N] [--lr LR] [-- extra fairseq-train flags]
#   --model     postln | preln | admin | admin-profiled | deepnorm
#   --layers    encoder-decoder depth (default 6-6; also 18-18, 60-12, ...)
#   --data      the prepare.sh output (default <repo>/work/multi30k)
#   --save      checkpoint directory (default DATA/checkpoints/MODEL-LAYERS)
#   --gpus      0 = CPU (default: the number of GPUs nvidia-smi lists); >0 adds --fp16
#   --max-update (default 10000)  --lr (default 1e-3)
#   --max-tokens N (per batch and worker, default 4096)  --tokens-per-update N (default 4096);
#   --update-freq = ceil(tokens-per-update / (max-tokens x workers))
# Multi30k is small (29k pairs), so the model is narrower than WMT's (d=256, FFN 1024, 4 heads),
# dropout is 0.3, warmup 1000 updates and an update sees 4096 tokens; the rest is the Admin
# paper's recipe (adam 0.9/0.98, inverse_sqrt from 1e-7, label smoothing 0.1, shared embeddings).
# Flags after -- are passed to fairseq-train last and override these (the tests shrink the model so).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

DATA="$REPO_DIR/work/multi30k" SAVE="" MODEL="" LAYERS=6-6 GPUS=$(gpu_count)
LR=1e-3 WARMUP=1000 DROPOUT=0.3 MAX_TOKENS=4096 TOTAL_TOKENS=4096 MAX_UPDATE=10000 MAX_EPOCH=0
ARCH_FLAGS="--encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --decoder-attention-heads 4"
SAVE_FLAGS="--keep-last-epochs 10"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --model) MODEL=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --save) SAVE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --max-update) MAX_UPDATE=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --tokens-per-update) TOTAL_TOKENS=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$MAX_TOKENS" =~ ^[1-9][0-9]*$ && "$TOTAL_TOKENS" =~ ^[1-9][0-9]*$ ]] \
  || die "--max-tokens and --tokens-per-update must be positive integers"
[[ -n "$MODEL" ]] || die "--model is required (postln, preln, admin, admin-profiled, deepnorm)"
model_flags "$MODEL" x >/dev/null; layer_flags "$LAYERS" >/dev/null
[[ -s "$DATA/bin/dict.en.txt" ]] || die "no prepared data in $DATA (run recipes/multi30k/prepare.sh)"
SAVE=${SAVE:-$DATA/checkpoints/$MODEL-$LAYERS}
train_model "$DATA/bin" "$SAVE" "$MODEL" "$LAYERS" "$GPUS" "${EXTRA[@]}"
