"""Training hyper-parameters and the step plan derived from them (spec 4.1)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from harness import HarnessError
from harness.options import ATTENTION_MASKS

SCHEDULES = ("linear", "constant")
PADDING_SIDES = ("right", "left")
OPTIMIZERS = ("paged_adamw_32bit", "adamw_torch", "adamw_32bit")


@dataclass
class TrainConfig:
    """Training hyper-parameters. Defaults are the published TOFU unlearning setup (spec 4.1)."""

    epochs: int = 10
    lr: float = 1e-5
    batch_size: int = 32  # effective (global) batch: per_device_batch * grad_accum * world_size
    per_device_batch: int = 4
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    schedule: str = "linear"  # "linear" (with warmup) | "constant" (MUSE; warmup then constant if > 0)
    optimizer: str = "paged_adamw_32bit"  # bitsandbytes on CUDA; the same update rule unpaged on CPU
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    max_length: int = 512  # used by callers when encoding items; recorded with the config
    accelerate: str = "single"  # "single" | "ddp" | "zero3" | path to an accelerate config file
    attention_mask: str = "reference"  # collator mask: "reference" (ids != pad, the quirk) or "corrected"
    # HF max_steps: train exactly this many optimizer steps (epochs repeat as needed; ``epochs`` is ignored)
    max_steps: int | None = None
    padding_side: str = "right"  # training batches; WMDP's reference collator pads on the left

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise HarnessError(f"training schedule {self.schedule!r} unknown; use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise HarnessError(f"optimizer {self.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "per_device_batch"):
            if int(getattr(self, name)) < 1:
                raise HarnessError(f"training {name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise HarnessError(f"training max_steps must be >= 1, got {self.max_steps}")
        if self.padding_side not in PADDING_SIDES:
            raise HarnessError(f"training padding_side {self.padding_side!r} unknown; use {' or '.join(PADDING_SIDES)}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise HarnessError(f"attention_mask {self.attention_mask!r} unknown; use {' or '.join(ATTENTION_MASKS)}")

    def grad_accum(self, world_size: int) -> int:
        """Gradient accumulation steps for ``world_size`` processes; an error if it does not divide."""
        per_step = self.per_device_batch * world_size
        if self.batch_size % per_step:
            raise HarnessError(
                f"--batch-size {self.batch_size} is not divisible by per-device batch {self.per_device_batch} x "
                f"{world_size} process(es); choose a batch size that is a multiple of {per_step}"
            )
        return self.batch_size // per_step


def plan(cfg: TrainConfig, n_examples: int, world_size: int) -> dict[str, int]:
    """Derived step counts, recorded in config.yaml: grad_accum, steps_per_epoch, total_steps, warmup_steps,
    epochs (``max_steps`` runs ceil(max_steps / steps_per_epoch) epochs, the last one cut short, as HF does)."""
    ga = cfg.grad_accum(world_size)
    per_rank = math.ceil(n_examples / world_size)
    micro = math.ceil(per_rank / cfg.per_device_batch)
    steps_per_epoch = math.ceil(micro / ga)
    # Spec 4.1 with the real number of processes in place of the visible GPU count.
    warmup = int((cfg.warmup_epochs * n_examples) // cfg.batch_size)
    return {
        "world_size": world_size,
        "grad_accum": ga,
        "micro_batches_per_epoch": micro,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": int(cfg.max_steps) if cfg.max_steps else steps_per_epoch * int(cfg.epochs),
        "epochs": math.ceil(int(cfg.max_steps) / steps_per_epoch) if cfg.max_steps else int(cfg.epochs),
        "warmup_steps": warmup,
    }


def config_dict(cfg: TrainConfig) -> dict:
    """The config as a plain dict (for config.yaml and the run hash)."""
    return dataclasses.asdict(cfg)
