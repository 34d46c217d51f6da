# Shared helpers of the recipes (sourced, not run): logging, tool checks, model flags, and the
# prepare / train / evaluate stages that the WMT14 and Multi30k recipes have in common.
# shellcheck shell=bash

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$RECIPES_DIR/.." && pwd)"
USER_DIR="$REPO_DIR/fairseq_plugins"
PYTHON="${PYTHON:-python}"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

need_tools() {  # need_tools fairseq-train python ...
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found on PATH (activate the environment: PATH=<repo>/.venv/bin:\$PATH)"
  done
}

# Find a corpus file with or without .gz: find_raw DIR NAME -> path (or nothing)
find_raw() {
  if [[ -f "$1/$2" ]]; then echo "$1/$2"; elif [[ -f "$1/$2.gz" ]]; then echo "$1/$2.gz"; fi
}

# Cat a (possibly gzipped) file, optionally only its first MAX_LINES lines (0 = all).
cat_raw() {  # cat_raw FILE MAX_LINES
  local reader=cat
  [[ "$1" == *.gz ]] && reader="gzip -dc"
  if [[ "${2:-0}" -gt 0 ]]; then $reader "$1" | head -n "$2" || true; else $reader "$1"; fi
}

# ---------------------------------------------------------------- prepare
# prepare_corpus RAW OUT SRC TGT VOCAB MAX_LINES
# RAW holds {train,valid,test}.{SRC,TGT}[.gz]. Writes OUT/text (normalized), OUT/spm.model (joint
# sentencepiece), OUT/spm (encoded), OUT/bin (fairseq-preprocess, joined dictionary).
# Each step is skipped when its output exists.
prepare_corpus() {
  local raw=$1 out=$2 src=$3 tgt=$4 vocab=$5 max_lines=${6:-0} split lang f
  need_tools fairseq-preprocess "$PYTHON"
  mkdir -p "$out/text" "$out/spm"
  for split in train valid test; do
    for lang in "$src" "$tgt"; do
      [[ -s "$out/text/$split.$lang" ]] && continue
      f=$(find_raw "$raw" "$split.$lang")
      [[ -n "$f" ]] || die "missing $raw/$split.$lang (or .gz)"
      log "normalize $f"
      local lines=$max_lines
      [[ $split != train ]] && [[ $max_lines -gt 0 ]] && lines=$(( max_lines / 4 > 50 ? max_lines / 4 : 50 ))
      cat_raw "$f" "$lines" | "$PYTHON" "$RECIPES_DIR/spm.py" normalize > "$out/text/$split.$lang.tmp"
      mv "$out/text/$split.$lang.tmp" "$out/text/$split.$lang"
    done
  done
  if [[ ! -s "$out/spm.model" ]]; then
    log "train a joint sentencepiece model ($vocab pieces)"
    "$PYTHON" "$RECIPES_DIR/spm.py" train --input "$out/text/train.$src" "$out/text/train.$tgt" \
      --model-prefix "$out/spm" --vocab-size "$vocab"
  fi
  for split in train valid test; do
    [[ -s "$out/spm/$split.$tgt" ]] && continue
    local clean=()
    [[ $split == train ]] && clean=(--max-len 250 --max-ratio 2.0)  # drop long / misaligned training pairs only
    log "encode $split"
    "$PYTHON" "$RECIPES_DIR/spm.py" encode --model "$out/spm.model" "${clean[@]}" \
      --inputs "$out/text/$split.$src" "$out/text/$split.$tgt" --outputs "$out/spm/$split.$src" "$out/spm/$split.$tgt"
  done
  if [[ ! -s "$out/bin/dict.$src.txt" ]]; then
    log "fairseq-preprocess (joined dictionary) -> $out/bin"
    rm -rf "$out/bin"
    fairseq-preprocess --source-lang "$src" --target-lang "$tgt" \
      --trainpref "$out/spm/train" --validpref "$out/spm/valid" --testpref "$out/spm/test" \
      --destdir "$out/bin" --joined-dictionary --workers "${WORKERS:-1}" > "$out/preprocess.log" 2>&1 \
      || { tail -n 20 "$out/preprocess.log" >&2; die "fairseq-preprocess failed (log: $out/preprocess.log)"; }
  fi
  log "prepared: $out/bin"
}

# ---------------------------------------------------------------- models
# model_flags MODEL SAVE_DIR -> fairseq-train flags of one of the compared residual schemes.
model_flags() {
  case $1 in
    postln)   echo "--arch transformer" ;;
    preln)    echo "--arch transformer --encoder-normalize-before --decoder-normalize-before" ;;
    admin)    echo "--arch transformer_admin --admin-init admin --admin-output-change-scale O(logn)" ;;
    admin-profiled)  # the original two-stage Admin: profile omegas on the first batch, then train them
              echo "--arch transformer_admin --admin-init profiled --admin-profile $2/admin_profile.json --encoder-as-parameter --decoder-as-parameter" ;;
    deepnorm) echo "--arch transformer_admin --admin-init deepnorm" ;;
    *) die "--model must be one of postln, preln, admin, admin-profiled, deepnorm (got '$1')" ;;
  esac
}

# layer_flags ENC-DEC (e.g. 6-6, 18-18, 60-12)
layer_flags() {
  [[ "$1" =~ ^([0-9]+)-([0-9]+)$ ]] || die "--layers must look like ENC-DEC, e.g. 6-6, 18-18, 60-12 (got '$1')"
  echo "--encoder-layers ${BASH_REMATCH[1]} --decoder-layers ${BASH_REMATCH[2]}"
}

# update_freq TOTAL_TOKENS MAX_TOKENS WORKERS: accumulate gradients so that one update still sees
# TOTAL_TOKENS tokens when fewer workers (GPUs) than the paper's are available.
update_freq() {
  local per_step=$(( $2 * $3 ))
  echo $(( ($1 + per_step - 1) / per_step ))
}

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

# ---------------------------------------------------------------- evaluate
# evaluate_model DATA_BIN SAVE_DIR TEXT_DIR SRC TGT N_AVG BEAM LENPEN SPLIT [extra generate flags...]
# Averages the last N_AVG epoch checkpoints (or takes checkpoint_last.pt when there are fewer than
# 2), decodes SPLIT, removes the sentencepiece segmentation and scores with sacrebleu against the
# normalized, untokenized references. Writes SAVE_DIR/{averaged.pt,SPLIT.hyp,SPLIT.bleu}.
evaluate_model() {
  local bin=$1 save=$2 text=$3 src=$4 tgt=$5 navg=$6 beam=$7 lenpen=$8 split=$9
  shift 9
  need_tools fairseq-generate sacrebleu "$PYTHON"
  local ckpt="$save/checkpoint_last.pt"
  [[ -f "$ckpt" ]] || die "no checkpoint in $save (run train.sh first)"
  if [[ "$navg" -gt 1 ]]; then
    log "average the last $navg epoch checkpoints of $save"
    "$PYTHON" "$RECIPES_DIR/average_checkpoints.py" --inputs "$save" --num-epoch-checkpoints "$navg" \
      --output "$save/averaged.pt" && ckpt="$save/averaged.pt"
  fi
  log "decode $split with $ckpt (beam $beam, lenpen $lenpen)"
  # --required-batch-size-multiple 1: fairseq-fixed 0.12.3.1's batch_by_size drops the last batch
  # when its size is not a multiple of it (default 8), i.e. the longest sentences would go untranslated.
  # fairseq_plugins.repairs.last_batch fixes that for every --user-dir run; the flag keeps it so without them.
  fairseq-generate "$bin" --user-dir "$USER_DIR" --path "$ckpt" --gen-subset "$split" \
    --source-lang "$src" --target-lang "$tgt" --beam "$beam" --lenpen "$lenpen" \
    --remove-bpe sentencepiece --max-tokens "${GEN_MAX_TOKENS:-4096}" --required-batch-size-multiple 1 "$@" > "$save/$split.gen" 2>"$save/$split.gen.log" \
    || { tail -n 20 "$save/$split.gen.log" >&2; die "fairseq-generate failed (log: $save/$split.gen.log)"; }
  # hypotheses in sentence order; a sentence fairseq-generate did not translate counts as empty
  local ref="$text/$split.$tgt" n missing
  n=$(wc -l < "$ref")
  awk -F'\t' -v n="$n" '/^H-/ { id = substr($1, 3); hyp[id] = $3; seen++ }
    END { for (i = 0; i < n; i++) print hyp[i]; print n - seen > "/dev/stderr" }' \
    "$save/$split.gen" > "$save/$split.hyp" 2> "$save/$split.missing"
  missing=$(cat "$save/$split.missing")
  [[ "$missing" -eq 0 ]] || log "warning: fairseq-generate left $missing of $n sentences untranslated (scored as empty)"
  sacrebleu "$ref" -i "$save/$split.hyp" -b > "$save/$split.bleu"
  echo "BLEU ($split, detokenized sacrebleu): $(cat "$save/$split.bleu")"
}

# ---------------------------------------------------------------- train
# train_model DATA_BIN SAVE_DIR MODEL LAYERS GPUS [extra fairseq-train flags...]
# Hyper-parameters come from the caller's variables (the recipe sets them, the user overrides with
# flags): ARCH_FLAGS (sizes), LR, WARMUP, DROPOUT, MAX_TOKENS (per worker), TOTAL_TOKENS (per
# update, all workers and accumulation steps together), MAX_UPDATE, MAX_EPOCH, SAVE_FLAGS, FP16 (1/0).
# GPUS=0 trains on the CPU (one process). Extra flags come last, so they override everything.
train_model() {
  local bin=$1 save=$2 model=$3 layers=$4 gpus=$5
  shift 5
  need_tools fairseq-train
  [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus must be a non-negative integer (got '$gpus')"
  local workers=$(( gpus > 0 ? gpus : 1 ))
  local freq; freq=$(update_freq "$TOTAL_TOKENS" "$MAX_TOKENS" "$workers")
  local device=(--cpu)
  if [[ $gpus -gt 0 ]]; then
    device=(--distributed-world-size "$gpus")  # fairseq spawns one process per GPU
    [[ ${FP16:-1} -eq 1 ]] && device+=(--fp16)
  fi
  mkdir -p "$save"
  log "train $model $layers on $bin: $workers worker(s) x $MAX_TOKENS tokens x update-freq $freq (~$TOTAL_TOKENS tokens/update) -> $save"
  # shellcheck disable=SC2046,SC2086
  fairseq-train "$bin" --user-dir "$USER_DIR" $(model_flags "$model" "$save") $(layer_flags "$layers") \
    $ARCH_FLAGS --share-all-embeddings \
    --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 0.0 \
    --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --warmup-init-lr 1e-07 \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
    --dropout "$DROPOUT" --attention-dropout "$DROPOUT" --activation-dropout "$DROPOUT" \
    --max-tokens "$MAX_TOKENS" --update-freq "$freq" --max-update "$MAX_UPDATE" --max-epoch "${MAX_EPOCH:-0}" \
    --save-dir "$save" $SAVE_FLAGS --seed "${SEED:-1}" "${device[@]}" \
    --log-format json --log-interval "${LOG_INTERVAL:-100}" --no-progress-bar \
    "$@" 2>&1 | tee "$save/train.log"
  local code=${PIPESTATUS[0]}
  [[ $code -eq 0 ]] || die "fairseq-train exited $code (log: $save/train.log)"
}
