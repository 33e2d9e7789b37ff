"""The field checks every part of a task file's schema shares (``harness.tasks`` and its ``attack:`` block,
``harness.task_attack``): a mapping with known keys (did-you-mean on a typo), a list of names, and the
``training:`` hyper-parameters. Each error is one line naming the file and the field; values are kept as
written (they enter the run hash)."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from harness import HarnessError


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def kind(v) -> str:
    return "null" if v is None else type(v).__name__


def check_keys(where: str, doc, allowed) -> dict:
    """``doc`` itself, once it is a mapping whose keys are all in ``allowed``."""
    if not isinstance(doc, dict):
        raise HarnessError(f"{where}: expected a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in allowed:
            raise HarnessError(f"{where}: unknown key '{k}'{suggest(k, allowed)}; valid keys: {', '.join(allowed)}")
    return doc


def str_list(where: str, value) -> tuple[str, ...]:
    """A name or a list of names (``None`` is none)."""
    value = [value] if isinstance(value, str) else ([] if value is None else value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _number(path: Path, key: str, v, *, integer: bool = False, positive: bool = True) -> None:
    field_ = f"{path}: training.{key}"
    if isinstance(v, str):
        hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if "e" in v.lower() and _parses_as_float(v) else ""
        raise HarnessError(f"{field_} must be a number, got the string {v!r}{hint}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HarnessError(f"{field_} must be a number, got {v!r} ({kind(v)})")
    if not math.isfinite(v):
        # the wording of run's check of flags and profiles, so every source reads the same
        raise HarnessError(f"training.{key} must be a finite number, got {v} (from {path})")
    if integer and v != int(v):
        raise HarnessError(f"{field_} must be a whole number, got {v}")
    if positive and v <= 0:
        raise HarnessError(f"{field_} must be positive, got {v}")
    if v < 0:
        raise HarnessError(f"{field_} must not be negative, got {v}")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flag(path: Path, key: str, v) -> None:
    if not isinstance(v, bool):
        raise HarnessError(f"{path}: training.{key} must be true or false, got {v!r} ({kind(v)})")


def _word(path: Path, key: str, v) -> None:
    if not isinstance(v, str) or not v:
        raise HarnessError(f"{path}: training.{key} must be a name (string), got {v!r} ({kind(v)})")


TRAINING_CHECKS = {
    "lr": lambda p, k, v: _number(p, k, v),
    "epochs": lambda p, k, v: _number(p, k, v, integer=True),
    "batch_size": lambda p, k, v: _number(p, k, v, integer=True),
    "per_device_batch": lambda p, k, v: _number(p, k, v, integer=True),
    "max_length": lambda p, k, v: _number(p, k, v, integer=True),
    "warmup_epochs": lambda p, k, v: _number(p, k, v, positive=False),
    "weight_decay": lambda p, k, v: _number(p, k, v, positive=False),
    "max_grad_norm": lambda p, k, v: _number(p, k, v, positive=False),  # 0 = no clipping
    "max_steps": lambda p, k, v: _number(p, k, v, integer=True),
    "schedule": _word,
    "optimizer": _word,
    "padding_side": _word,
    "gradient_checkpointing": _flag,
}


def training(path: Path, raw, *, keys: tuple[str, ...], where: str = "training") -> dict[str, Any]:
    """A ``training:`` block (or ``methods.<name>.training``) of task file ``path``, with only ``keys``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: field '{where}' must be a mapping of hyper-parameters, got {kind(raw)} {raw!r}")
    for k, v in raw.items():
        if k not in keys:
            raise HarnessError(f"{path}: {where}: unknown key '{k}'{suggest(str(k), keys)}; valid: {', '.join(keys)}")
        try:
            TRAINING_CHECKS.get(k, lambda *_: None)(path, k, v)
        except HarnessError as exc:  # the checks name "training.<key>"; say which block it was
            raise HarnessError(str(exc).replace(f"training.{k}", f"{where}.{k}")) from None
    return dict(raw)
