"""Relearning attack (targeted relearning: Hu et al., 2024; Łucki et al., 2024): finetune a copy of the
scored model for a few optimizer steps on a seeded part of the forget set through the harness's one
training loop, then score the forget metrics on the rows it did not see (the split of Deeb & Roger, 2024),
for the attacked and the un-attacked model alike.

The task's ``attack.relearn`` names the role it trains on (``train``, default ``forget``) and the roles
whose rows are the same questions in the same order (``heldout``, e.g. TOFU's ``forget_eval``); those roles
are scored on the held-out rows only. The split depends on ``split_seed`` alone, so every method, seed and
the Finetuned row are measured on the same rows; the training order follows the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import HarnessError, hookimpl
from harness.attacks import Attack, Attacked, AttackInput, copy_model


def split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: a permutation seeded by ``seed``, its first ``int(n * fraction)`` rows
    train; both parts sorted."""
    import torch

    k = int(n * fraction)
    if not 1 <= k < n:
        raise HarnessError(f"attack 'relearn': fraction {fraction} of {n} rows leaves no rows to train on or to "
                           "score; need at least one of each")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:k]), sorted(perm[k:])


@dataclass
class Relearn(Attack):
    name: ClassVar[str] = "relearn"
    version: ClassVar[int] = 1
    description: ClassVar[str] = "finetune a copy on half the forget set, score the other half"
    fraction: float = 0.5       # of the forget rows the attack trains on
    split_seed: int = 0         # which rows: the same for every method and seed
    epochs: int = 2             # 2 passes over 20 TOFU forget01 rows at batch 4 = 10 optimizer steps
    batch_size: int = 4
    lr: float | None = None     # None: the run's training learning rate (task, then model profile)

    def check(self) -> None:
        if not 0 < self.fraction < 1:
            raise HarnessError(f"attack 'relearn': fraction must be between 0 and 1 (exclusive), got {self.fraction}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise HarnessError(f"attack 'relearn': {key} must be at least 1, got {getattr(self, key)}")
        if self.lr is not None and self.lr <= 0:
            raise HarnessError(f"attack 'relearn': lr must be positive, got {self.lr}")

    def apply(self, inp: AttackInput) -> Attacked:
        from harness.data.encode import encode_qa
        from harness.data.splits import load_split
        from harness.training import TrainConfig, finetune

        task = inp.task
        spec = task.attack
        rows = _rows(load_split(task.data_spec(spec.train), inp.data_dir), inp.limit)
        for role in spec.heldout:
            other = _rows(load_split(task.data_spec(role), inp.data_dir), inp.limit)
            if len(other) != len(rows):
                raise HarnessError(f"task '{task.name}' ({task.file}): attack.relearn.heldout role '{role}' has "
                                   f"{len(other)} rows but the training role '{spec.train}' has {len(rows)}; "
                                   "held-out roles must hold the same questions in the same order")
        train_idx, held_idx = split_rows(len(rows), self.fraction, self.split_seed)
        q, a = task.field_name("question"), task.field_name("answer")
        max_length = int(inp.max_length or inp.training.get("max_length") or 512)
        items = []
        for i in train_idx:
            if q not in rows[i] or a not in rows[i]:
                raise HarnessError(f"task '{task.name}': attack.relearn.train role '{spec.train}' row {i} has no "
                                   f"'{q}'/'{a}' field (fields: {', '.join(rows[i])})")
            items.append(encode_qa(inp.tokenizer, inp.template, rows[i][q], rows[i][a], max_length=max_length))
        lr = float(self.lr if self.lr is not None else inp.training.get("lr", 1e-5))
        cfg = TrainConfig(epochs=self.epochs, lr=lr, batch_size=self.batch_size, per_device_batch=self.batch_size,
                          warmup_epochs=0.0, weight_decay=0.0, schedule="constant", optimizer="adamw_torch",
                          seed=inp.seed, max_length=max_length, accelerate="single",
                          attention_mask=inp.attention_mask)
        result = finetune(copy_model(inp.model), inp.tokenizer, items, cfg, desc="relearn attack")
        info = {"train_role": spec.train, "heldout_roles": list(spec.heldout), "train_rows": train_idx,
                "heldout_rows": held_idx, "lr": lr, "seed": inp.seed,
                "steps": result.info.get("total_steps"), "optimizer": result.info.get("optimizer")}
        return Attacked(result.model, info, heldout={role: held_idx for role in spec.heldout})


def _rows(rows: list, limit: int | None) -> list:
    return rows[:limit] if limit else rows


@hookimpl
def register_attacks(register):
    register(Relearn)
