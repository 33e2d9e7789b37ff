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
  grid_usage tofu_unlearn.sh <<'EOF'
  --model       model profiles (default: llama2-7b-chat,llama3.2-1b-instruct); `tiny` (or env
                HARNESS_MODEL=tiny) runs the same grid on the embedded model on CPU with its own
                training defaults
EOF
}

# shellcheck source=scripts/_grid.sh
source "$(dirname "${BASH_SOURCE[0]}")/_grid.sh"
grid_options llama2-7b-chat,llama3.2-1b-instruct "$@"

SPLITS=(forget01 forget05 forget10)
grid_methods grad_ascent grad_diff idk_dpo npo simnpo -- rmu undial wga satimp ce_u pdu altpo
for model in "${MODEL_LIST[@]}"; do
  grid_model_args "$model" --epochs 10 --lr 1e-5 --train-batch-size 32 --per-device-batch 4 \
    --optimizer paged_adamw_32bit --gradient-checkpointing
  grid_add_cells tofu "${SPLITS[@]}"
done
grid_run tofu
