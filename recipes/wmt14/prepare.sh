#!/usr/bin/env bash
# WMT14 English-German or English-French: (download), normalize, joint sentencepiece, encode,
# fairseq-preprocess with a joined dictionary.
#
# Usage: recipes/wmt14/prepare.sh --pair en-de|en-fr (--raw DIR | --download) [--out DIR]
#                                 [--vocab N] [--max-lines N]
#   --pair       en-de (default) or en-fr
#   --raw DIR    local files {train,valid,test}.{en,de|fr}[.gz], one sentence per line, aligned
#   --download   fetch the WMT14 corpora (needs internet, ~2.5 GB for en-de, ~40 GB for en-fr):
#                train  http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
#                       http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
#                       http://statmt.org/wmt14/training-parallel-nc-v9.tgz
#                       en-fr also: http://statmt.org/wmt13/training-parallel-un.tgz
#                                   http://statmt.org/wmt10/training-giga-fren.tar
#                valid  newstest2013, test newstest2014 (full, 3003 lines), both through
#                       `sacrebleu -t wmt13|wmt14/full -l en-XX --echo src|ref`
#   --out DIR    output (default <repo>/work/wmt14_PAIR): raw/ text/ spm.model spm/ bin/
#   --vocab N    joint sentencepiece vocabulary (default 32000 for en-de, 40000 for en-fr)
#   --max-lines  only the first N training lines (N/4 of valid and test, at least 50); for tests
# Training pairs longer than 250 pieces or with a length ratio above 2 are dropped.
# Steps whose output exists are skipped (delete the output to redo them).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

PAIR=en-de RAW="" OUT="" VOCAB="" MAX_LINES=0 DOWNLOAD=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --pair) PAIR=$2; shift 2 ;;
    --raw) RAW=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --vocab) VOCAB=$2; shift 2 ;;
    --max-lines) MAX_LINES=$2; shift 2 ;;
    --download) DOWNLOAD=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case $PAIR in
  en-de) TGT=de; VOCAB=${VOCAB:-32000} ;;
  en-fr) TGT=fr; VOCAB=${VOCAB:-40000} ;;
  *) die "--pair must be en-de or en-fr (got '$PAIR')" ;;
esac
[[ "$MAX_LINES" =~ ^[0-9]+$ ]] || die "--max-lines must be a non-negative integer (got '$MAX_LINES')"
OUT=${OUT:-$REPO_DIR/work/wmt14_${PAIR/-/_}}
mkdir -p "$OUT"

download() {  # -> $OUT/raw/{train,valid,test}.{en,TGT}
  need_tools curl tar sacrebleu
  local dl="$OUT/download" f url
  mkdir -p "$dl" "$OUT/raw"
  local urls=(http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
              http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
              http://statmt.org/wmt14/training-parallel-nc-v9.tgz)
  [[ $TGT == fr ]] && urls+=(http://statmt.org/wmt13/training-parallel-un.tgz http://statmt.org/wmt10/training-giga-fren.tar)
  for url in "${urls[@]}"; do
    f="$dl/$(basename "$url")"
    [[ -s "$f.done" ]] && continue
    log "download $url"
    curl -fL --retry 3 -o "$f" "$url"
    tar -xf "$f" -C "$dl" && echo ok > "$f.done"
  done
  local corpora=(europarl-v7.$TGT-en commoncrawl.$TGT-en training/news-commentary-v9.$TGT-en)
  [[ $TGT == fr ]] && { corpora+=(un/undoc.2000.fr-en);
    [[ -f "$dl/giga-fren.release2.fixed.en" ]] || gzip -dk "$dl"/giga-fren.release2.fixed.{en,fr}.gz;
    corpora+=(giga-fren.release2.fixed); }
  local l c
  for l in en "$TGT"; do
    [[ -s "$OUT/raw/train.$l" ]] && continue
    for c in "${corpora[@]}"; do
      f=$(find "$dl" -path "*$c.$l" | head -n 1)
      [[ -n "$f" ]] || die "downloaded corpus $c.$l not found under $dl"
      cat "$f"
    done > "$OUT/raw/train.$l.tmp" && mv "$OUT/raw/train.$l.tmp" "$OUT/raw/train.$l"
  done
  sacrebleu -t wmt13 -l "en-$TGT" --echo src > "$OUT/raw/valid.en"
  sacrebleu -t wmt13 -l "en-$TGT" --echo ref > "$OUT/raw/valid.$TGT"
  sacrebleu -t wmt14/full -l "en-$TGT" --echo src > "$OUT/raw/test.en"
  sacrebleu -t wmt14/full -l "en-$TGT" --echo ref > "$OUT/raw/test.$TGT"
}

if [[ $DOWNLOAD -eq 1 ]]; then
  download
  RAW="$OUT/raw"
fi
[[ -n "$RAW" ]] || die "give --raw DIR (local {train,valid,test}.{en,$TGT}) or --download"
[[ -d "$RAW" ]] || die "--raw: no such directory: $RAW"
prepare_corpus "$RAW" "$OUT" en "$TGT" "$VOCAB" "$MAX_LINES"
