#!/usr/bin/env bash
# Evaluate a WMT14 model as in the Admin paper: average the last 10 epoch checkpoints, beam 4,
# length penalty 0.6, detokenized sacrebleu on newstest2014 (test split of prepare.sh).
#
# Usage: recipes/wmt14/evaluate.sh --save DIR [--pair en-de|en-fr] [--data DIR] [--average N]
#                                  [--split test|valid] [--beam 4] [--lenpen 0.6] [-- generate flags]
# Prints and writes SAVE/SPLIT.bleu.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

PAIR=en-de DATA="" SAVE="" NAVG=10 SPLIT=test BEAM=4 LENPEN=0.6 EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --save) SAVE=$2; shift 2 ;;
    --pair) PAIR=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --average) NAVG=$2; shift 2 ;;
    --split) SPLIT=$2; shift 2 ;;
    --beam) BEAM=$2; shift 2 ;;
    --lenpen) LENPEN=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case $PAIR in en-de) TGT=de ;; en-fr) TGT=fr ;; *) die "--pair must be en-de or en-fr (got '$PAIR')" ;; esac
[[ -n "$SAVE" ]] || die "--save DIR is required"
DATA=${DATA:-$REPO_DIR/work/wmt14_${PAIR/-/_}}
evaluate_model "$DATA/bin" "$SAVE" "$DATA/text" en "$TGT" "$NAVG" "$BEAM" "$LENPEN" "$SPLIT" "${EXTRA[@]}"
