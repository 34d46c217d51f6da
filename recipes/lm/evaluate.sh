#!/usr/bin/env bash
# Perplexity of a trained language model (recipes/lm/train.sh) with fairseq-eval-lm.
#
# Usage: recipes/lm/evaluate.sh --save DIR [--data DIR] [--split valid|test] [--checkpoint NAME]
#   --save        the training's checkpoint directory
#   --data        the prepare.sh output (default <repo>/work/lm)
#   --split       valid or test (default test)
#   --checkpoint  checkpoint file in --save (default checkpoint_best.pt)
# Prints "Loss (base 2): L, Perplexity: P" and writes it to SAVE/SPLIT.ppl. Admin checkpoints are
# scored with --user-dir fairseq_plugins; a folded one (python -m fairseq_plugins.fold_checkpoint)
# scores the same without it.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

DATA="$REPO_DIR/work/lm" SAVE="" SPLIT=test CKPT=checkpoint_best.pt
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --save) SAVE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --split) SPLIT=$2; shift 2 ;;
    --checkpoint) CKPT=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$SAVE" ]] || die "--save DIR is required"
[[ "$SPLIT" == valid || "$SPLIT" == test ]] || die "--split must be valid or test (got '$SPLIT')"
[[ -s "$SAVE/$CKPT" ]] || die "no checkpoint $SAVE/$CKPT"
[[ -s "$DATA/bin/dict.txt" ]] || die "no prepared data in $DATA (run recipes/lm/prepare.sh)"
need_tools fairseq-eval-lm
fairseq-eval-lm "$DATA/bin" --path "$SAVE/$CKPT" --user-dir "$USER_DIR" --gen-subset "$SPLIT" \
  --sample-break-mode eos --tokens-per-sample 128 --max-tokens 4096 --cpu --num-workers 0 \
  > "$SAVE/$SPLIT.evallm.log" 2>&1 || { tail -n 20 "$SAVE/$SPLIT.evallm.log" >&2; die "fairseq-eval-lm failed"; }
grep -o "Loss (base 2): [0-9.]*, Perplexity: [0-9.]*" "$SAVE/$SPLIT.evallm.log" | tee "$SAVE/$SPLIT.ppl"
