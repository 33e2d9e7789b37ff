"""Scoring during training (``--eval-every``) and keeping the best weights (``--keep-best``).

The training loop calls a ``PeriodicEval`` at step 0 (the start model, as the reference's
``eval_on_start``), every ``interval`` optimizer steps and at the last step. Scoring itself comes from
above (``score``: a callable from the commands floor that runs the one scoring path on a plain model),
so this floor knows nothing of metrics. What it owns:

- the schedule: whole optimizer steps, or a fraction of an epoch turned into steps with the real world size;
- a plain model to score: the unwrapped model (single process, DDP) or a consolidated copy (ZeRO-3: every
  rank gathers, so every rank takes part); every rank scores, rank 0's values are broadcast so all ranks
  take the same keep-best decision;
- the torch RNG state around scoring, so a run with ``--eval-every`` trains exactly as one without;
- the best weights: the optimizer-updated parameters of the best step, copied to CPU memory on rank 0,
  loaded into the final model at the end and broadcast to the other ranks.

Candidates for ``--keep-best`` are the scored steps from 1 on (step 0 is the model before unlearning and is
logged for the curve only); ties keep the earlier step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DIRECTIONS = ("min", "max", "zero", "one")  # zero / one: the value closest to 0 (privleak) / to 1


def interval(every: int | float, steps_per_epoch: int) -> int:
    """Optimizer steps between two scorings: ``every`` itself (an int) or that fraction of an epoch."""
    if isinstance(every, int):
        return every
    return max(1, round(every * steps_per_epoch))


def is_better(value: float, best: float | None, direction: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    if direction == "min":
        return value < best
    if direction == "max":
        return value > best
    target = 1.0 if direction == "one" else 0.0
    return abs(value - target) < abs(best - target)


@dataclass
class PeriodicEval:
    """``every``: steps (int) or a fraction of an epoch (float < 1); ``score(model) -> {name: value}`` runs
    on every rank; ``keep_best``: ``(metric, direction)`` or None."""

    every: int | float
    score: Callable[[object], dict[str, float | None]]
    keep_best: tuple[str, str] | None = None
    at_start: bool = True
    _interval: int = 0
    _last: int = 0
    _names: list[str] = field(default_factory=list)
    best: dict | None = None  # {"metric", "direction", "step", "epoch", "value"}
    _weights: dict[str, torch.Tensor] | None = None

    def start(self, total_steps: int, steps_per_epoch: int, model, only: set[str] | None) -> None:
        """Fix the schedule and which parameters change (those the optimizer updates)."""
        self._interval = interval(self.every, steps_per_epoch)
        self._last = total_steps
        self._names = [n for n, p in model.named_parameters() if p.requires_grad and (only is None or n in only)]

    def due(self, step: int) -> bool:
        return step == self._last or (step > 0 and step % self._interval == 0)

    def steps(self) -> list[int]:
        """Every step this schedule scores (for config.yaml and the tests)."""
        out = [s for s in range(self._interval, self._last + 1, self._interval)]
        if not out or out[-1] != self._last:
            out.append(self._last)
        return ([0] if self.at_start else []) + out

    def __call__(self, accelerator, model, step: int, epoch: float) -> dict:
        """Score ``model`` (the prepared training model) at ``step``: the log row's ``eval/*`` part."""
        from harness.training import distributed as dist_utils

        t0 = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), dist_utils.plain_view(accelerator, model) as plain:
            was_training = plain.training
            plain.eval()  # the scoring path does this too; here it holds for any callback
            try:
                with torch.no_grad():
                    values = dict(self.score(plain))
            finally:
                plain.train(was_training)
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                values = broadcast_object_list([values], from_process=0)[0]
            row = {f"eval/{k}": v for k, v in values.items()}
            if self.keep_best is not None:
                metric, direction = self.keep_best
                value = values.get(metric)
                if step > 0 and is_better(value, None if self.best is None else self.best["value"], direction):
                    self.best = {"metric": metric, "direction": direction, "step": step, "epoch": epoch,
                                 "value": value}
                    if accelerator.is_main_process:
                        params = dict(plain.named_parameters())
                        self._weights = {n: params[n].detach().to("cpu", copy=True) for n in self._names}
                if self.best is not None:
                    row["eval/best_step"] = self.best["step"]
        row["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return row

    def restore(self, accelerator, plain) -> None:
        """Load the best step's weights into ``plain`` (the final, consolidated model) on every rank."""
        if self.best is None or self.best["step"] == self._last:
            return
        params = dict(plain.named_parameters())
        with torch.no_grad():
            if accelerator.is_main_process:
                for n, w in self._weights.items():
                    params[n].copy_(w.to(params[n].device, params[n].dtype))
            if accelerator.num_processes > 1:
                import torch.distributed as dist

                for n in self._names:
                    dist.broadcast(params[n].data, src=0)
        self._weights = None

    def record(self) -> dict:
        """What config.yaml records (``plan.during_training``)."""
        out = {"interval_steps": self._interval, "steps": self.steps()}
        if self.keep_best is not None:
            out["keep_best"] = self.best or {"metric": self.keep_best[0], "direction": self.keep_best[1],
                                             "step": None}
        return out
