"""The Method contract: a dataclass of hyper-parameters plus ``loss()``.

Core owns data pairing, batching, seeds, optimizer, schedule, reference model and saving;
a method only turns one batch into a loss. Built-in methods live in ``methods/``, one file each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from harness import HarnessError

ReferenceKind = Literal["none", "logprobs", "model"]
REFERENCE_KINDS: tuple[str, ...] = typing.get_args(ReferenceKind)


@dataclass
class Method:
    """Base for unlearning methods. Subclasses are dataclasses; fields are hyper-parameters.

    ``loss(model, batch, ref)`` gets ``batch = {"forget": {...}, "retain": {...}}`` (plus
    ``"idk"`` when ``uses_idk``), each part a dict of tensors ``input_ids``, ``attention_mask``,
    ``labels`` (prompt masked with -100) and ``index``. Returns a scalar tensor or ``(loss, parts)``
    where ``parts`` is a dict of floats/tensors logged to train_log.jsonl (e.g. ``forget``, ``retain``).

    ``reference`` declares what ``loss`` asks of ``ref`` (a ``harness.training.StartModel``):

    - ``"none"``: nothing; ``ref`` is ``None`` and core makes no frozen copy of the start model.
    - ``"logprobs"``: only ``ref.sequence_logprob(part, name)``. Core precomputes the forget set's
      log-probs once and releases the frozen copy before training; for ``uses_idk`` methods the copy
      stays to memoise each drawn idk pair once (there are ~100 idk answers per question, too many to
      precompute). ``ref.logits`` is an error.
    - ``"model"``: also ``ref.logits(part)`` of the live frozen model (KL retain terms); kept throughout.

    When a hyper-parameter changes the need (``retain_loss_type="KL"``), override ``reference_needed()``;
    core reads only ``reference_of(method)``, which calls it.

    ``prepare(start)`` (optional) runs once before training on the unchanged start model (a
    ``harness.training.Preparation``: forget items and texts, ``generate``, ``cached``, ``encode``). It
    returns ``None`` or a dict of item lists: ``"forget"`` replaces the forget items, any other name is a
    batch part aligned with them (AltPO: ``{"forget": originals, "alternate": sampled answers}``).
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    reference: ClassVar[ReferenceKind] = "none"
    uses_idk: ClassVar[bool] = False

    def __post_init__(self):
        check_fields(self)

    def reference_needed(self) -> ReferenceKind:
        """What this configuration needs of the frozen start model; the class's ``reference`` by default."""
        return type(self).reference

    @property
    def needs_reference(self) -> bool:
        """Deprecated reader kept for old code: whether any frozen start model is needed."""
        return reference_of(self) != "none"

    @needs_reference.setter
    def needs_reference(self, value: bool) -> None:
        # Old plugins set this per instance in __post_init__; reference_of() maps it.
        self.__dict__["needs_reference"] = bool(value)

    def prepare(self, start) -> dict | None:
        """Nothing to prepare by default; see the class docstring."""
        return None

    def loss(self, model, batch, ref):  # pragma: no cover - abstract
        raise NotImplementedError


def _declares(cls: type, attr: str) -> bool:
    return any(attr in vars(c) for c in cls.__mro__ if c is not Method and c is not object)


def reference_of(method) -> ReferenceKind:
    """The one reading of a method's reference need that core uses (training loop, ``harness ls``).

    Plugins written for the old contract declare ``needs_reference = True`` (class attribute, or set per
    instance) and optionally ``reference_logprobs_only``; without a ``reference`` declaration these map to
    ``"model"`` (or ``"logprobs"``), and ``needs_reference = False`` to ``"none"``.
    """
    cls = type(method)
    legacy = method.__dict__.get("needs_reference") if hasattr(method, "__dict__") else None
    if legacy is None and _declares(cls, "needs_reference"):
        legacy = next(vars(c)["needs_reference"] for c in cls.__mro__ if "needs_reference" in vars(c))
    uses_hook = _declares(cls, "reference_needed")
    if isinstance(legacy, bool) and not uses_hook and not _declares(cls, "reference"):
        if not legacy:
            return "none"
        return "logprobs" if getattr(method, "reference_logprobs_only", False) else "model"
    kind = method.reference_needed() if isinstance(method, Method) else getattr(method, "reference", "none")
    if kind not in REFERENCE_KINDS:
        raise HarnessError(f"method '{getattr(method, 'name', cls.__name__)}': reference must be one of "
                           f"{', '.join(REFERENCE_KINDS)}, got {kind!r}")
    return kind


def method_fields(cls: type[Method]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve (TYPE_CHECKING import): no Literal checks
        return {}


def literal_choices(cls: type, field: str) -> tuple | None:
    """The allowed values of a ``Literal[...]``-typed hyper-parameter (``None`` for other types)."""
    hint = _hints(cls).get(field)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _choices_error(method: str, key: str, value: Any, choices: tuple) -> HarnessError:
    valid = ", ".join(map(str, choices))
    return HarnessError(f"method '{method}': {key} must be one of {valid}, got {value!r}")


def check_fields(obj: Method) -> None:
    """Every ``Literal[...]`` hyper-parameter holds one of its values, every float is finite."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise _choices_error(cls.name or cls.__name__, f.name, value, typing.get_args(hint))
        if isinstance(value, float) and not math.isfinite(value):
            raise HarnessError(f"method '{cls.name}': hyper-parameter '{f.name}' must be finite, got {value}")


def build_method(cls: type[Method], overrides: dict[str, Any]) -> Method:
    """Instantiate ``cls`` with ``--set name.field=value`` overrides, validating names and values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in overrides.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise HarnessError(f"method '{cls.name}' has no hyper-parameter '{key}'; valid: {valid}")
        choices = literal_choices(cls, key)
        if choices is not None:
            kwargs[key] = _coerce_choice(cls.name, key, raw, choices)
        else:
            kwargs[key] = _coerce(cls.name, key, raw, fields[key].default)
    obj = cls(**kwargs)
    check_fields(obj)  # again: a subclass __post_init__ need not call the base's
    reference_of(obj)
    return obj


def _coerce_choice(method: str, key: str, raw: Any, choices: tuple) -> Any:
    if raw in choices:
        return raw
    # --set gives strings: match a Literal[1, 2] or Literal[True, ...] value by its text
    match = [c for c in choices if str(c) == str(raw)]
    if match:
        return match[0]
    raise _choices_error(method, key, raw, choices)


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
