#!/usr/bin/env bash
# Prepare a language-modelling corpus: normalize, sentencepiece, encode, fairseq-preprocess --only-source.
#
# Usage: recipes/lm/prepare.sh --raw DIR [--lang L] [--out DIR] [--vocab N] [--max-lines N]
#   --raw DIR       raw text files {train,val|valid,test*}.L[.gz], one sentence a line
#                   (e.g. ../shared/data/multi30k with --lang en: the English side of Multi30k)
#   --lang L        the file suffix (default en)
#   --out DIR       output (default <repo>/work/lm): text/ spm.model spm/ bin/
#   --vocab N       sentencepiece vocabulary (default 8000)
#   --max-lines N   only the first N training lines (N/4 of valid and test, at least 50); for tests
# Steps whose output exists are skipped (delete the output to redo them).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

RAW="" LANG_="en" OUT="$REPO_DIR/work/lm" VOCAB=8000 MAX_LINES=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --raw) RAW=$2; shift 2 ;;
    --lang) LANG_=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --vocab) VOCAB=$2; shift 2 ;;
    --max-lines) MAX_LINES=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$RAW" ]] || die "give --raw DIR (raw text files {train,val,test}.$LANG_)"
[[ -d "$RAW" ]] || die "--raw: no such directory: $RAW"
[[ "$MAX_LINES" =~ ^[0-9]+$ ]] || die "--max-lines must be a non-negative integer (got '$MAX_LINES')"
[[ "$VOCAB" =~ ^[1-9][0-9]*$ ]] || die "--vocab must be a positive integer (got '$VOCAB')"
need_tools fairseq-preprocess "$PYTHON"
mkdir -p "$OUT/text" "$OUT/spm"
for split in train valid test; do
  [[ -s "$OUT/text/$split.txt" ]] && continue
  f=""
  for name in "$split" $([[ $split == valid ]] && echo val) $([[ $split == test ]] && echo test_2016_flickr); do
    f=$(find_raw "$RAW" "$name.$LANG_"); [[ -n "$f" ]] && break
  done
  [[ -n "$f" ]] || die "missing $RAW/$split.$LANG_ (or .gz)"
  lines=$MAX_LINES
  [[ $split != train && $MAX_LINES -gt 0 ]] && lines=$(( MAX_LINES / 4 > 50 ? MAX_LINES / 4 : 50 ))
  log "normalize $f"
  cat_raw "$f" "$lines" | "$PYTHON" "$RECIPES_DIR/spm.py" normalize > "$OUT/text/$split.tmp"
  mv "$OUT/text/$split.tmp" "$OUT/text/$split.txt"
done
if [[ ! -s "$OUT/spm.model" ]]; then
  log "train a sentencepiece model ($VOCAB pieces)"
  "$PYTHON" "$RECIPES_DIR/spm.py" train --input "$OUT/text/train.txt" --model-prefix "$OUT/spm" --vocab-size "$VOCAB"
fi
for split in train valid test; do
  [[ -s "$OUT/spm/$split.txt" ]] && continue
  log "encode $split"
  "$PYTHON" "$RECIPES_DIR/spm.py" encode --model "$OUT/spm.model" --inputs "$OUT/text/$split.txt" \
    --outputs "$OUT/spm/$split.txt"
done
if [[ ! -s "$OUT/bin/dict.txt" ]]; then
  log "fairseq-preprocess --only-source -> $OUT/bin"
  rm -rf "$OUT/bin"
  fairseq-preprocess --only-source --trainpref "$OUT/spm/train.txt" --validpref "$OUT/spm/valid.txt" \
    --testpref "$OUT/spm/test.txt" --destdir "$OUT/bin" --workers "${WORKERS:-1}" > "$OUT/preprocess.log" 2>&1 \
    || { tail -n 20 "$OUT/preprocess.log" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.log)"; }
fi
log "prepared: $OUT/bin"
