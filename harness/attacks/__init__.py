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
import math
import typing
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

    def check(self) -> None:
        """Reject settings the attack cannot run with (raise HarnessError); called when it is built."""


def copy_model(model):
    """A deep copy to attack: the scored model (and the checkpoint it was saved as) are never touched."""
    return copy.deepcopy(model)


def parse_settings(pairs: list[str], names: list[str], registry) -> dict[str, dict[str, Any]]:
    """``--attack-set ATTACK.FIELD=VALUE`` (repeatable) -> attack -> field -> typed value, checked against the
    attack's dataclass fields before anything runs: the attack must be one of ``--attacks``, the field one
    of its settings (did-you-mean), the value of the field's type."""
    from harness.tasks import suggest

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        name, dot, fld = key.strip().partition(".")
        if not eq or not dot or not fld or not value.strip():
            raise HarnessError(f"--attack-set {pair!r}: expected ATTACK.FIELD=VALUE, e.g. relearn.epochs=4")
        if name not in names:
            raise HarnessError(f"--attack-set {pair!r}: attack '{name}' is not in --attacks "
                               f"({', '.join(names) or 'none given'}){suggest(name, names)}")
        cls = registry.attacks.get(name)
        if cls is None:  # build_attacks names the unknown attack
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if fld not in fields:
            raise HarnessError(f"--attack-set {pair!r}: attack '{name}' has no setting '{fld}'{suggest(fld, fields)}; "
                               f"settings: {', '.join(fields) or '(none)'}")
        if fld in out.get(name, {}):
            raise HarnessError(f"--attack-set {name}.{fld} is given twice; give it once")
        out.setdefault(name, {})[fld] = _typed(f"--attack-set {pair!r}", cls, fields[fld], value.strip())
    return out


def _typed(where: str, cls: type, f: dataclasses.Field, text: str) -> Any:
    """``text`` as a value of field ``f`` of attack ``cls`` (bool, int, float, Literal choices, str; ``none``
    for an optional field)."""
    hint = typing.get_type_hints(cls).get(f.name, str)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        match = [c for c in typing.get_args(hint) if str(c) == text]
        if not match:
            raise HarnessError(f"{where}: use one of {', '.join(map(str, typing.get_args(hint)))}")
        return match[0]
    if type(None) in typing.get_args(hint) and text.lower() in ("none", "null"):
        return None
    kind = args[0] if args else hint
    try:
        if kind is bool:
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes", "on")
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        what = {bool: "true or false", int: "a whole number", float: "a finite number"}[kind]
        raise HarnessError(f"{where}: {f.name} must be {what}, got {text!r}") from None
    return text


def build_attacks(names: list[str], registry, settings: dict[str, dict[str, Any]] | None = None) -> list[Attack]:
    """Instances of the attacks ``names`` with ``settings`` (attack -> field -> value, from
    ``parse_settings``) over their defaults; an unknown name is a did-you-mean error."""
    from harness.tasks import suggest

    out = []
    for name in names:
        if name not in registry.attacks:
            avail = ", ".join(sorted(registry.attacks)) or "(none)"
            broken = f"; plugins that failed to load: {'; '.join(registry.failures)}" if registry.failures else ""
            raise HarnessError(f"--attacks: unknown attack '{name}'{suggest(name, registry.attacks)}; "
                               f"available: {avail} (harness ls attacks){broken}")
        try:
            given = (settings or {}).get(name, {})
            attack = registry.attacks[name](**given)
            attack.check()
            out.append(attack)
        except HarnessError as exc:
            if given:  # say where the values came from
                raise HarnessError(f"--attack-set {', '.join(f'{name}.{k}={v}' for k, v in given.items())}: {exc}") from None
            raise
        except Exception as exc:
            src = registry.sources.get(("attacks", name), "?")
            raise HarnessError(f"attack '{name}' from plugin '{src}' failed to build: {type(exc).__name__}: {exc}") from exc
    return out


def describe(attack: Attack) -> dict:
    """What enters the run hash and scores.json for one attack."""
    return {"version": attack.version, "settings": attack.settings()}
