#!/usr/bin/env bash
# Train one WMT14 model with the Admin paper's recipe (Liu et al. 2020, Table/appendix):
# adam (0.9, 0.98), lr 1e-3, inverse_sqrt with 8000 warmup updates from 1e-7, label smoothing 0.1,
# dropout / attention / relu dropout 0.1, shared embeddings, 4096 tokens x 8 GPUs per update, fp16,
# base width (512 / 2048 / 8 heads). With fewer GPUs --update-freq is raised to keep 32768
# tokens per update (e.g. 2 GPUs: update-freq 4; CPU: 8).
#
# Usage: recipes/wmt14/train.sh --model MODEL --layers E-D [--pair en-de|en-fr] [--data DIR]
#                               [--save DIR] [--gpus N] [--no-fp16] [--max-update N]
#                               [-- extra fairseq-train flags]
#   --model     postln | preln | admin | admin-profiled | deepnorm
#               (admin = closed-form omega O(logn); admin-profiled = the paper's two-stage Admin
#               with trainable omega vectors; postln / preln = fairseq's stock transformer)
#   --layers    6-6 (default), 18-18, 60-12 (the paper's En-Fr), any E-D
#   --pair      en-de (default) or en-fr;  --data  prepare.sh output (default <repo>/work/wmt14_PAIR)
#   --save      checkpoint directory (default DATA/checkpoints/MODEL-LAYERS)
#   --gpus      number of GPUs (default: all that nvidia-smi lists; 0 = CPU)
#   --no-fp16   train in fp32 on GPUs;  --max-update N (default 500000, with --max-epoch 50)
#   --max-tokens N         tokens per batch and worker (default 4096)
#   --tokens-per-update N  tokens per update over all workers (default 32768 = 4096 x 8 GPUs);
#                          --update-freq = ceil(N / (max-tokens x workers))
# Examples:
#   recipes/wmt14/train.sh --model admin --layers 18-18                 # 8 GPUs: the paper's setup
#   recipes/wmt14/train.sh --model admin --layers 60-12 --pair en-fr --gpus 4
# Flags after -- go to fairseq-train last and override the recipe's.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

PAIR=en-de DATA="" SAVE="" MODEL="" LAYERS=6-6 GPUS=$(gpu_count) FP16=1
LR=1e-3 WARMUP=8000 DROPOUT=0.1 MAX_TOKENS=4096 TOTAL_TOKENS=$((4096 * 8)) MAX_UPDATE=500000 MAX_EPOCH=50
ARCH_FLAGS="--encoder-embed-dim 512 --decoder-embed-dim 512 --encoder-ffn-embed-dim 2048 --decoder-ffn-embed-dim 2048 --encoder-attention-heads 8 --decoder-attention-heads 8"
SAVE_FLAGS="--keep-last-epochs 10"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --model) MODEL=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --pair) PAIR=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --save) SAVE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --no-fp16) FP16=0; shift ;;
    --max-update) MAX_UPDATE=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --tokens-per-update) TOTAL_TOKENS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case $PAIR in en-de|en-fr) ;; *) die "--pair must be en-de or en-fr (got '$PAIR')" ;; esac
[[ "$MAX_TOKENS" =~ ^[1-9][0-9]*$ && "$TOTAL_TOKENS" =~ ^[1-9][0-9]*$ ]] \
  || die "--max-tokens and --tokens-per-update must be positive integers"
[[ -n "$MODEL" ]] || die "--model is required (postln, preln, admin, admin-profiled, deepnorm)"
model_flags "$MODEL" x >/dev/null; layer_flags "$LAYERS" >/dev/null
DATA=${DATA:-$REPO_DIR/work/wmt14_${PAIR/-/_}}
[[ -s "$DATA/bin/dict.en.txt" ]] || die "no prepared data in $DATA (run recipes/wmt14/prepare.sh --pair $PAIR)"
SAVE=${SAVE:-$DATA/checkpoints/$MODEL-$LAYERS}
train_model "$DATA/bin" "$SAVE" "$MODEL" "$LAYERS" "$GPUS" "${EXTRA[@]}"
