"""The attack contract: a transform of a scored model after which the task's forget-side metrics (and its
utility summary) are scored again with the same code (docs/attacks.md).

An attack is a dataclass of settings plus ``apply(inp) -> Attacked``. It gets the scored model and must
not change it: it works on a copy (``copy_model``), so the saved unlearned model and the cached references
stay as they are. ``Attacked.heldout`` restricts scoring to rows the attack did not see (role -> row
indices); the un-attacked model is then scored on those rows too, so before and after compare like with
like.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness import HarnessError


@dataclass
class AttackInput:
    """What an attack may read. ``training``: the run's training defaults (task, then model profile), e.g.
    the learning rate a relearning attack finetunes with; ``spec``: the task's ``attack:`` block."""

    model: Any
    tokenizer: Any
    task: Any
    template: Any
    seed: int
    training: dict = field(default_factory=dict)
    data_dir: str | None = None
    limit: int | None = None
    attention_mask: str = "reference"
    max_length: int | None = None


@dataclass
class Attacked:
    """An attack's result: the attacked copy, what it did (recorded in scores.json) and, when it used part
    of the task's data, the held-out rows (role -> indices) that are scored instead of all rows."""

    model: Any
    info: dict = field(default_factory=dict)
    heldout: dict[str, list[int]] | None = None


@dataclass
class Attack:
    """Base of every attack (built-in or plugin). Fields are the settings (recorded with ``version``)."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""

    def apply(self, inp: AttackInput) -> Attacked:
        raise NotImplementedError

    def settings(self) -> dict:
        return dataclasses.asdict(self)


def copy_model(model):
    """A deep copy to attack: the scored model (and the checkpoint it was saved as) are never touched."""
    return copy.deepcopy(model)


def build_attacks(names: list[str], registry) -> list[Attack]:
    """Instances (default settings) of the attacks ``names``; an unknown name is a did-you-mean error."""
    from harness.tasks import suggest

    out = []
    for name in names:
        if name not in registry.attacks:
            avail = ", ".join(sorted(registry.attacks)) or "(none)"
            broken = f"; plugins that failed to load: {'; '.join(registry.failures)}" if registry.failures else ""
            raise HarnessError(f"--attacks: unknown attack '{name}'{suggest(name, registry.attacks)}; "
                               f"available: {avail} (harness ls attacks){broken}")
        try:
            out.append(registry.attacks[name]())
        except HarnessError:
            raise
        except Exception as exc:
            src = registry.sources.get(("attacks", name), "?")
            raise HarnessError(f"attack '{name}' from plugin '{src}' failed to build: {type(exc).__name__}: {exc}") from exc
    return out


def describe(attack: Attack) -> dict:
    """What enters the run hash and scores.json for one attack."""
    return {"version": attack.version, "settings": attack.settings()}
