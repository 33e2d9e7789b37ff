"""The Method contract: a dataclass of hyper-parameters plus ``loss()``.

Core owns data pairing, batching, seeds, optimizer, schedule, reference model and saving;
a method only turns one batch into a loss. Built-in methods live in ``methods/``, one file each.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from harness import HarnessError


@dataclass
class Method:
    """Base for unlearning methods. Subclasses are dataclasses; fields are hyper-parameters.

    ``loss(model, batch, ref)`` gets ``batch = {"forget": {...}, "retain": {...}}`` (plus
    ``"idk"`` when ``uses_idk``), each part a dict of tensors ``input_ids``, ``attention_mask``,
    ``labels`` (prompt masked with -100) and ``index``. ``ref`` is a ``harness.train.Reference``
    (``None`` unless ``needs_reference``). Returns a scalar tensor or ``(loss, parts)`` where
    ``parts`` is a dict of floats/tensors logged to train_log.jsonl (e.g. ``forget``, ``retain``).
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    uses_idk: ClassVar[bool] = False

    def loss(self, model, batch, ref):  # pragma: no cover - abstract
        raise NotImplementedError


def method_fields(cls: type[Method]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def build_method(cls: type[Method], overrides: dict[str, Any]) -> Method:
    """Instantiate ``cls`` with ``--set name.field=value`` overrides, validating names and values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in overrides.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise HarnessError(f"method '{cls.name}' has no hyper-parameter '{key}'; valid: {valid}")
        default = fields[key].default
        kwargs[key] = _coerce(cls.name, key, raw, default)
    obj = cls(**kwargs)
    for key, value in dataclasses.asdict(obj).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise HarnessError(f"method '{cls.name}': hyper-parameter '{key}' must be finite, got {value}")
    return obj


def _coerce(method: str, key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise HarnessError(
            f"method '{method}': cannot parse {key}={raw!r} as {type(default).__name__}"
        ) from None
    return raw
