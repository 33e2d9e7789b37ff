#!/usr/bin/env bash
# Reproduce the published TOFU unlearning table: forget01/05/10 x {GradAscent, GradDiff, IdkDPO, NPO,
# SimNPO} on Llama-2-7b-chat and Llama-3.2-1B-Instruct (start: the TOFU-finetuned checkpoints of the
# model profiles), plus the Finetuned and Retain rows (those models scored, not unlearned).
# Published setup: lr 1e-5, 10 epochs, effective batch 32 (4 per device), ZeRO-3, paged_adamw_32bit,
# gradient checkpointing, method defaults (alpha = gamma = 1, beta = 0.1 for NPO/IdkDPO).
# A thin wrapper: every cell is one `harness run` / `harness eval`; finished runs are skipped, so a
# rerun resumes. See docs/reproduce.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/tofu_unlearn.sh [--model PROFILE[,PROFILE]|tiny] [--seeds 0,1,2] [-o DIR]
                               [--shard i/n] [--dry-run] [--limit N] [--accelerate CFG] [-- RUN_ARGS...]

  --model       model profiles (default: llama2-7b-chat,llama3.2-1b-instruct); `tiny` (or env
                HARNESS_MODEL=tiny) runs the same grid on the embedded model on CPU with its own
                training defaults
  --seeds       comma-separated seeds for every unlearning cell (default 0)
  -o/--output   results folder (default results)
  --shard i/n   run only cells i, i+n, i+2n, ... (0-based; e.g. a Slurm array task id)
  --dry-run     print the grid, one command per line, and exit (no harness call)
  --limit N     first N rows of every split (smoke test; results are marked partial)
  --accelerate  accelerate preset or config for unlearning runs (default zero3; none on tiny)
  -- ARGS       passed to every `harness run` (e.g. -- --set npo.beta=0.2)
EOF
}

MODELS="${HARNESS_MODEL:-}"
SEEDS=0
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
MODELS="${MODELS:-llama2-7b-chat,llama3.2-1b-instruct}"

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

SPLITS=(forget01 forget05 forget10)
METHODS=(grad_ascent grad_diff idk_dpo npo simnpo)

# One cell = one harness command, stored shell-quoted so paths with spaces survive.
CELLS=()
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
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
for model in "${MODEL_LIST[@]}"; do
  common=(--model "$model" -o "$OUT")
  [[ -n "$LIMIT" ]] && common+=(--limit "$LIMIT")
  if [[ "$model" == tiny ]]; then
    # The tiny profile carries its own training defaults (a tiny model barely moves at 1e-5).
    train=()
    accel="$ACCEL"
  else
    train=(--epochs 10 --lr 1e-5 --batch-size 32 --per-device-batch 4 --optimizer paged_adamw_32bit
           --gradient-checkpointing)
    accel="${ACCEL:-zero3}"
  fi
  [[ -n "$accel" && "$accel" != none ]] && train+=(--accelerate "$accel")
  for split in "${SPLITS[@]}"; do
    task="tofu_$split"
    add_cell eval -t "$task" --name finetuned "${common[@]}"
    add_cell eval -t "$task" --name retain --retain-model "${common[@]}"
  done
  for split in "${SPLITS[@]}"; do
    for method in "${METHODS[@]}"; do
      add_cell run -t "tofu_$split" -m "$method" --seeds "$SEEDS" "${common[@]}" "${train[@]}" "${RUN_EXTRA[@]}"
    done
  done
done

total=${#CELLS[@]}
failed=()
for ((k = 0; k < total; k++)); do
  (( k % SHARD_N == SHARD_I )) || continue
  if (( DRY )); then
    echo "harness ${CELLS[$k]}"
    continue
  fi
  eval "words=(${CELLS[$k]})"
  echo "[tofu $((k + 1))/$total] harness ${CELLS[$k]}" >&2
  if ! "${HARNESS_CMD[@]}" "${words[@]}"; then
    failed+=("${CELLS[$k]}")
  fi
done

if (( ${#failed[@]} )); then
  echo "tofu_unlearn: ${#failed[@]} cell(s) failed (rerun the script to retry them; finished cells are skipped):" >&2
  printf '  harness %s\n' "${failed[@]}" >&2
  exit 1
fi
(( DRY )) || echo "tofu_unlearn: done; see: ${HARNESS_CMD[*]} report $OUT --compare --plot $OUT/tofu.png" >&2
