#!/usr/bin/env bash
# Multi30k (Task 1) English-German: normalize, joint sentencepiece, encode, fairseq-preprocess.
#
# Usage: recipes/multi30k/prepare.sh --raw DIR [--out DIR] [--vocab N] [--max-lines N]
#        recipes/multi30k/prepare.sh --download [--out DIR] ...
#   --raw DIR       the raw files {train,val,test_2016_flickr}.{en,de}[.gz] (e.g. ../shared/data/multi30k)
#   --download      fetch them first from https://github.com/multi30k/dataset/raw/master/data/task1/raw/
#   --out DIR       output (default <repo>/work/multi30k): text/ spm.model spm/ bin/
#   --vocab N       joint sentencepiece vocabulary (default 8000)
#   --max-lines N   only the first N training lines (N/4 of valid and test, at least 50); for tests
# Steps whose output exists are skipped (delete the output to redo them).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

RAW="" OUT="$REPO_DIR/work/multi30k" VOCAB=8000 MAX_LINES=0 DOWNLOAD=0
URL=https://github.com/multi30k/dataset/raw/master/data/task1/raw
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --raw) RAW=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --vocab) VOCAB=$2; shift 2 ;;
    --max-lines) MAX_LINES=$2; shift 2 ;;
    --download) DOWNLOAD=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$MAX_LINES" =~ ^[0-9]+$ ]] || die "--max-lines must be a non-negative integer (got '$MAX_LINES')"
mkdir -p "$OUT/raw"
if [[ $DOWNLOAD -eq 1 ]]; then
  RAW="$OUT/download"; mkdir -p "$RAW"
  for f in train val test_2016_flickr; do for l in en de; do
    [[ -s "$RAW/$f.$l.gz" ]] || { log "download $URL/$f.$l.gz"; curl -fsSL -o "$RAW/$f.$l.gz" "$URL/$f.$l.gz"; }
  done; done
fi
[[ -n "$RAW" ]] || die "give --raw DIR (the Multi30k raw files) or --download"
[[ -d "$RAW" ]] || die "--raw: no such directory: $RAW"
RAW=$(cd "$RAW" && pwd)
# the recipe's split names -> the data set's file names
for pair in train:train valid:val test:test_2016_flickr; do
  for l in en de; do
    f=$(find_raw "$RAW" "${pair#*:}.$l"); [[ -n "$f" ]] || die "missing $RAW/${pair#*:}.$l(.gz)"
    ext=""; [[ "$f" == *.gz ]] && ext=.gz
    ln -sf "$f" "$OUT/raw/${pair%%:*}.$l$ext"
  done
done
prepare_corpus "$OUT/raw" "$OUT" en de "$VOCAB" "$MAX_LINES"
