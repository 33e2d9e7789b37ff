"""The task YAML ``attack:`` block (docs/tasks.md, docs/attacks.md): which of the task's metrics
``--attacks`` scores again, and the data roles of the relearning attack. Checked with the rest of the task
schema when the file is parsed (unknown keys and roles are errors naming the file, with a suggestion)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import HarnessError
from harness.task_fields import check_keys, str_list, suggest

ATTACK_KEYS = ("metrics", "utility", "relearn")
RELEARN_KEYS = ("train", "heldout")


@dataclass(frozen=True)
class AttackSpec:
    """Forget-side ``metrics`` and ``utility`` summary scored again after each attack; the relearning attack
    trains on rows of ``train`` and scores the ``heldout`` roles (same questions, same order) on the others."""

    metrics: tuple[str, ...] = ()
    utility: tuple[str, ...] = ()
    train: str = "forget"
    heldout: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"metrics": list(self.metrics), "utility": list(self.utility),
                "relearn": {"train": self.train, "heldout": list(self.heldout)}}


def parse_attack(path: Path, raw, data: dict) -> AttackSpec | None:
    """The ``attack:`` block of task file ``path`` (``data``: its roles); None when the task has none."""
    if raw is None:
        return None
    check_keys(f"{path}: attack", raw, ATTACK_KEYS)
    rel = check_keys(f"{path}: attack.relearn", raw.get("relearn") or {}, RELEARN_KEYS)
    spec = AttackSpec(str_list(f"{path}: attack.metrics", raw.get("metrics")),
                      str_list(f"{path}: attack.utility", raw.get("utility")),
                      str(rel.get("train", "forget")), str_list(f"{path}: attack.relearn.heldout", rel.get("heldout")))
    for role in (spec.train, *spec.heldout):
        if role not in data:
            raise HarnessError(f"{path}: attack.relearn: no data role '{role}'{suggest(role, data)}")
    return spec
