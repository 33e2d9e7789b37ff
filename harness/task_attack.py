"""The task YAML ``attack:`` block (docs/tasks.md, docs/attacks.md): which of the task's metrics
``--attacks`` scores again, and the data roles of the relearning attack. Checked with the rest of the task
schema when the file is parsed (unknown keys and roles are errors naming the file, with a suggestion)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from harness import HarnessError

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


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _mapping(where: str, doc, allowed) -> dict:
    if not isinstance(doc, dict):
        raise HarnessError(f"{where}: expected a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in allowed:
            raise HarnessError(f"{where}: unknown key '{k}'{_suggest(k, allowed)}; valid keys: {', '.join(allowed)}")
    return doc


def _names(where: str, value) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else (value or [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def parse_attack(path: Path, raw, data: dict) -> AttackSpec | None:
    """The ``attack:`` block of task file ``path`` (``data``: its roles); None when the task has none."""
    if raw is None:
        return None
    _mapping(f"{path}: attack", raw, ATTACK_KEYS)
    rel = _mapping(f"{path}: attack.relearn", raw.get("relearn") or {}, RELEARN_KEYS)
    spec = AttackSpec(_names(f"{path}: attack.metrics", raw.get("metrics")),
                      _names(f"{path}: attack.utility", raw.get("utility")),
                      str(rel.get("train", "forget")), _names(f"{path}: attack.relearn.heldout", rel.get("heldout")))
    for role in (spec.train, *spec.heldout):
        if role not in data:
            raise HarnessError(f"{path}: attack.relearn: no data role '{role}'{_suggest(role, data)}")
    return spec
