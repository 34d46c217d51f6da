#!/usr/bin/env bash
# Evaluate a Multi30k model: average the last checkpoints, beam search, detokenized sacrebleu.
#
# Usage: recipes/multi30k/evaluate.sh --save DIR [--data DIR] [--average N] [--split test|valid]
#                                     [--beam 4] [--lenpen 0.6] [-- extra fairseq-generate flags]
#   --save     the checkpoint directory of train.sh
#   --data     the prepare.sh output (default <repo>/work/multi30k)
#   --average  average the last N epoch checkpoints (default 10; 1 = checkpoint_last.pt)
# Prints and writes SAVE/SPLIT.bleu (sacrebleu on the sentencepiece-decoded hypotheses against the
# normalized, untokenized references).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

DATA="$REPO_DIR/work/multi30k" SAVE="" NAVG=10 SPLIT=test BEAM=4 LENPEN=0.6 EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --save) SAVE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --average) NAVG=$2; shift 2 ;;
    --split) SPLIT=$2; shift 2 ;;
    --beam) BEAM=$2; shift 2 ;;
    --lenpen) LENPEN=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$SAVE" ]] || die "--save DIR is required"
evaluate_model "$DATA/bin" "$SAVE" "$DATA/text" en de "$NAVG" "$BEAM" "$LENPEN" "$SPLIT" "${EXTRA[@]}"
