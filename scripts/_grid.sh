# Shared by the grid wrappers (tofu_unlearn.sh, muse_unlearn.sh): option parsing, sharding, the harness
# command, cell quoting and the run loop. Sourced, not executed; each wrapper defines `usage` and its
# own grid (splits, methods, published training arguments) and calls these in order:
#   grid_options DEFAULT_MODELS "$@"; for each model: grid_model_args / grid_add_cells; grid_run NAME

# grid_usage SCRIPT: the --help text; the wrapper gives its own --model lines on stdin.
grid_usage() {
  echo "usage: scripts/$1 [--model PROFILE[,PROFILE]|tiny] [--methods M[,M]] [--seeds 0,1,2] [-o DIR]"
  printf '%*s%s\n' $(( ${#1} + 16 )) '' "[--shard i/n] [--dry-run] [--limit N] [--accelerate CFG] [-- RUN_ARGS...]"
  echo
  cat
  cat <<'EOF'
  --methods     comma-separated methods (default: the published grid's). Also accepted: rmu, undial,
                wga, satimp, ce_u, pdu, altpo; these take epochs and learning rate from the task's
                per-method defaults (the reference experiments'), not the published grid's
  --seeds       comma-separated seeds for every unlearning cell (default 0)
  -o/--output   results folder (default results)
  --shard i/n   run only cells i, i+n, i+2n, ... (0-based; e.g. a Slurm array task id)
  --dry-run     print the grid, one command per line, and exit (no harness call)
  --limit N     first N rows of every split (smoke test; results are marked partial)
  --accelerate  accelerate preset or config for unlearning runs (default zero3; none on tiny)
  -- ARGS       passed to every `harness run` (e.g. -- --set npo.beta=0.2)
EOF
}

grid_options() {
  local default_models="$1"
  shift
  MODELS="${HARNESS_MODEL:-}"
  SEEDS=0
  METHODS_OPT=""
  OUT=results
  SHARD=""
  DRY=0
  LIMIT=""
  ACCEL=""
  RUN_EXTRA=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --model) MODELS="${2:?--model needs a value}"; shift 2 ;;
      --model=*) MODELS="${1#*=}"; shift ;;
      --methods) METHODS_OPT="${2:?--methods needs a value}"; shift 2 ;;
      --methods=*) METHODS_OPT="${1#*=}"; shift ;;
      --seeds) SEEDS="${2:?--seeds needs a value}"; shift 2 ;;
      --seeds=*) SEEDS="${1#*=}"; shift ;;
      -o|--output) OUT="${2:?--output needs a value}"; shift 2 ;;
      --output=*) OUT="${1#*=}"; shift ;;
      --shard) SHARD="${2:?--shard needs i/n}"; shift 2 ;;
      --shard=*) SHARD="${1#*=}"; shift ;;
      --dry-run) DRY=1; shift ;;
      --limit) LIMIT="${2:?--limit needs a value}"; shift 2 ;;
      --limit=*) LIMIT="${1#*=}"; shift ;;
      --accelerate) ACCEL="${2:?--accelerate needs a value}"; shift 2 ;;
      --accelerate=*) ACCEL="${1#*=}"; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; RUN_EXTRA=("$@"); break ;;
      *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
  done
  MODELS="${MODELS:-$default_models}"
  IFS=',' read -r -a MODEL_LIST <<<"$MODELS"

  SHARD_I=0
  SHARD_N=1
  if [[ -n "$SHARD" ]]; then
    if [[ ! "$SHARD" =~ ^([0-9]+)/([0-9]+)$ ]] || (( BASH_REMATCH[2] < 1 || BASH_REMATCH[1] >= BASH_REMATCH[2] )); then
      echo "error: --shard '$SHARD' must be i/n with 0 <= i < n (e.g. 0/4)" >&2
      exit 2
    fi
    SHARD_I="${BASH_REMATCH[1]}"
    SHARD_N="${BASH_REMATCH[2]}"
  fi

  # The harness command: $HARNESS if set (shell words, e.g. "python -m harness"), the console script
  # if installed, else the module.
  if [[ -n "${HARNESS:-}" ]]; then
    eval "HARNESS_CMD=($HARNESS)"
  elif command -v harness >/dev/null 2>&1; then
    HARNESS_CMD=(harness)
  else
    HARNESS_CMD=("${PYTHON:-python}" -m harness)
  fi
  CELLS=()
}

# grid_methods PUBLISHED... -- OTHERS...: METHODS = the --methods list (each one of the published or the
# other accepted names) or, without --methods, the published grid.
grid_methods() {
  PUBLISHED=()
  local others=() m ok
  while [[ $# -gt 0 && "$1" != -- ]]; do PUBLISHED+=("$1"); shift; done
  [[ "${1:-}" == -- ]] && shift
  others=("$@")
  if [[ -z "$METHODS_OPT" ]]; then
    METHODS=("${PUBLISHED[@]}")
    return
  fi
  IFS=',' read -r -a METHODS <<<"$METHODS_OPT"
  for m in "${METHODS[@]}"; do
    ok=0
    for k in "${PUBLISHED[@]}" "${others[@]}"; do [[ "$m" == "$k" ]] && ok=1; done
    if (( ! ok )); then
      echo "error: --methods: unknown method '$m' (accepted: ${PUBLISHED[*]} ${others[*]})" >&2
      exit 2
    fi
  done
}

# One cell = one harness command, stored shell-quoted so paths with spaces survive.
add_cell() {
  local word quoted=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      quoted+="$word "
    else
      quoted+="'${word//\'/\'\\\'\'}' "
    fi
  done
  CELLS+=("${quoted% }")
}

# grid_model_args MODEL PUBLISHED_TRAIN_ARGS...: sets `common` (every cell) and `train` (unlearning
# runs) for one model. The tiny profile carries its own training defaults (a tiny model barely moves
# at 1e-5), so it gets no published arguments and a single process unless --accelerate says otherwise.
grid_model_args() {
  local model="$1" accel
  shift
  common=(--model "$model" -o "$OUT")
  [[ -n "$LIMIT" ]] && common+=(--limit "$LIMIT")
  if [[ "$model" == tiny ]]; then
    train=()
    accel="$ACCEL"
  else
    train=("$@")
    accel="${ACCEL:-zero3}"
  fi
  [[ -n "$accel" && "$accel" != none ]] && train+=(--accelerate "$accel")
  # the same without --epochs / --lr: for methods outside the published grid
  train_own=()
  local i=0
  while (( i < ${#train[@]} )); do
    case "${train[$i]}" in
      --epochs|--lr) i=$((i + 2)) ;;
      *) train_own+=("${train[$i]}"); i=$((i + 1)) ;;
    esac
  done
}

# grid_add_cells BENCH SPLIT...: the Finetuned and Retain evaluations of every split, then every
# METHODS x split unlearning run, for the model of the last grid_model_args.
grid_add_cells() {
  local bench="$1" split method
  shift
  for split in "$@"; do
    add_cell eval -t "${bench}_$split" --name finetuned "${common[@]}"
    add_cell eval -t "${bench}_$split" --name retain --retain-model "${common[@]}"
  done
  for split in "$@"; do
    for method in "${METHODS[@]}"; do
      if [[ " ${PUBLISHED[*]} " == *" $method "* ]]; then
        add_cell run -t "${bench}_$split" -m "$method" --seeds "$SEEDS" "${common[@]}" "${train[@]}" "${RUN_EXTRA[@]}"
      else  # the task's per-method epochs / lr (the reference experiments'), not the published grid's
        add_cell run -t "${bench}_$split" -m "$method" --seeds "$SEEDS" "${common[@]}" "${train_own[@]}" \
          "${RUN_EXTRA[@]}"
      fi
    done
  done
}

# grid_run BENCH: print (--dry-run) or run this shard's cells; failures are collected so the other
# cells still run, and a rerun retries them (finished cells are skipped by the harness).
grid_run() {
  local bench="$1" total=${#CELLS[@]} k failed=() words
  for ((k = 0; k < total; k++)); do
    (( k % SHARD_N == SHARD_I )) || continue
    if (( DRY )); then
      echo "harness ${CELLS[$k]}"
      continue
    fi
    eval "words=(${CELLS[$k]})"
    echo "[$bench $((k + 1))/$total] harness ${CELLS[$k]}" >&2
    if ! "${HARNESS_CMD[@]}" "${words[@]}"; then
      failed+=("${CELLS[$k]}")
    fi
  done

  if (( ${#failed[@]} )); then
    echo "${bench}_unlearn: ${#failed[@]} cell(s) failed (rerun the script to retry them; finished cells are skipped):" >&2
    printf '  harness %s\n' "${failed[@]}" >&2
    exit 1
  fi
  (( DRY )) || echo "${bench}_unlearn: done; see: ${HARNESS_CMD[*]} report $OUT --compare --plot $OUT/$bench.png" >&2
}
