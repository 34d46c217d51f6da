#!/usr/bin/env bash
# Train one decoder-only language model on prepared data (recipes/lm/prepare.sh), on a CPU or GPUs.
#
# Usage: recipes/lm/train.sh --model MODEL [--layers N] [--data DIR] [--save DIR] [--gpus N]
#                            [--max-update N] [--lr LR] [--warmup N] [--seed S] [-- extra fairseq-train flags]
#   --model     postln | preln | admin | admin-profiled | deepnorm
#                 postln: fairseq's transformer_lm (Post-LN)   preln: the same with --decoder-normalize-before
#                 admin, admin-profiled, deepnorm: transformer_lm_admin (--user-dir fairseq_plugins)
#   --layers    decoder layers (default 12)      --dim D    model width (default 256; FFN 4D, 4 heads)
#   --data      the prepare.sh output (default <repo>/work/lm)
#   --save      checkpoint directory (default DATA/checkpoints/MODEL-LAYERS-sSEED)
#   --gpus      0 = CPU (default: the number of GPUs nvidia-smi lists); >0 adds --fp16
#   --max-update (default 4000)  --lr (default 1e-3)  --warmup (default 400)  --seed (default 1)
#   --max-tokens N (default 2048)  --tokens-per-update N (default 2048)
# The model is d=DIM, FFN 4 DIM, 4 heads, dropout 0.1, sentences as samples (--sample-break-mode eos,
# at most 128 tokens), shared input/output embeddings; adam (0.9, 0.98), inverse_sqrt from 1e-7.
# Flags after -- are passed to fairseq-train last and override these.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

DATA="$REPO_DIR/work/lm" SAVE="" MODEL="" LAYERS=12 DIM=256 GPUS=$(gpu_count) SEED=1
LR=1e-3 WARMUP=400 MAX_TOKENS=2048 TOTAL_TOKENS=2048 MAX_UPDATE=4000
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --model) MODEL=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --dim) DIM=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --save) SAVE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --max-update) MAX_UPDATE=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --tokens-per-update) TOTAL_TOKENS=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$MODEL" ]] || die "--model is required (postln, preln, admin, admin-profiled, deepnorm)"
[[ "$LAYERS" =~ ^[1-9][0-9]*$ ]] || die "--layers must be a positive integer (got '$LAYERS')"
for v in MAX_TOKENS TOTAL_TOKENS MAX_UPDATE WARMUP SEED GPUS DIM; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a non-negative integer (got '${!v}')"
done
SAVE=${SAVE:-$DATA/checkpoints/$MODEL-$LAYERS-s$SEED}
case $MODEL in
  postln)   FLAGS=(--arch transformer_lm) ;;
  preln)    FLAGS=(--arch transformer_lm --decoder-normalize-before) ;;
  admin)    FLAGS=(--user-dir "$USER_DIR" --arch transformer_lm_admin --admin-init admin) ;;
  admin-profiled) FLAGS=(--user-dir "$USER_DIR" --arch transformer_lm_admin --admin-init profiled
                         --admin-profile "$SAVE/admin_profile.json" --decoder-as-parameter) ;;
  deepnorm) FLAGS=(--user-dir "$USER_DIR" --arch transformer_lm_admin --admin-init deepnorm) ;;
  *) die "--model must be one of postln, preln, admin, admin-profiled, deepnorm (got '$MODEL')" ;;
esac
[[ -s "$DATA/bin/dict.txt" ]] || die "no prepared data in $DATA (run recipes/lm/prepare.sh)"
need_tools fairseq-train
workers=$(( GPUS > 0 ? GPUS : 1 ))
freq=$(update_freq "$TOTAL_TOKENS" "$MAX_TOKENS" "$workers")
device=(--cpu)
[[ $GPUS -gt 0 ]] && device=(--distributed-world-size "$GPUS" --fp16)
mkdir -p "$SAVE"
log "train $MODEL, $LAYERS layers, lr $LR, seed $SEED on $DATA/bin -> $SAVE"
fairseq-train "$DATA/bin" --task language_modeling --sample-break-mode eos --tokens-per-sample 128 \
  "${FLAGS[@]}" --decoder-layers "$LAYERS" --decoder-embed-dim "$DIM" --decoder-ffn-embed-dim $(( 4 * DIM )) \
  --decoder-attention-heads 4 --decoder-input-dim "$DIM" --decoder-output-dim "$DIM" \
  --share-decoder-input-output-embed --dropout 0.1 \
  --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 \
  --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --warmup-init-lr 1e-07 \
  --max-tokens "$MAX_TOKENS" --update-freq "$freq" --max-update "$MAX_UPDATE" \
  --save-dir "$SAVE" --no-epoch-checkpoints --seed "$SEED" "${device[@]}" \
  --log-format json --log-interval "${LOG_INTERVAL:-50}" --no-progress-bar \
  "${EXTRA[@]}" 2>&1 | tee "$SAVE/train.log"
code=${PIPESTATUS[0]}
[[ $code -eq 0 ]] || die "fairseq-train exited $code (log: $SAVE/train.log)"
