#!/usr/bin/env bash
# Reproduce the published MUSE unlearning table: News/Books x {GradAscent, GradDiff, NPO, SimNPO} on the
# Llama-2-7b targets (profile llama2-7b: muse-bench/MUSE-<split>_target), plus the Finetuned (target)
# and Retain (retrain) rows, scored, not unlearned.
# Published setup: lr 1e-5 constant, 10 epochs, effective batch 64 (4 per device), ZeRO-3,
# paged_adamw_32bit, method defaults (alpha = gamma = 1, beta = 0.1 for NPO).
# A thin wrapper: every cell is one `harness run` / `harness eval`; finished runs are skipped, so a
# rerun resumes. See docs/reproduce.md.
set -uo pipefail

usage() {
  grid_usage muse_unlearn.sh <<'EOF'
  --model       model profiles (default: llama2-7b); `tiny` (or env HARNESS_MODEL=tiny) runs the
                same grid on the embedded model on CPU with its own training defaults (News only:
                MUSE-Books data is not bundled, so Books is reported as skipped)
EOF
}

# shellcheck source=scripts/_grid.sh
source "$(dirname "${BASH_SOURCE[0]}")/_grid.sh"
grid_options llama2-7b "$@"

SPLITS=(news books)
grid_methods grad_ascent grad_diff npo simnpo -- rmu undial wga satimp ce_u pdu altpo
for model in "${MODEL_LIST[@]}"; do
  grid_model_args "$model" --epochs 10 --lr 1e-5 --train-batch-size 64 --per-device-batch 4 \
    --optimizer paged_adamw_32bit
  splits=("${SPLITS[@]}")
  if [[ "$model" == tiny ]]; then
    splits=(news)
    echo "muse_unlearn: muse_books skipped on the embedded tiny model (MUSE-Books data is not bundled)" >&2
  fi
  grid_add_cells muse "${splits[@]}"
done
grid_run muse
