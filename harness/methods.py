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
    - ``"model"``: also ``ref.logits(part)`` of the live frozen model (KL retain terms); kept throughout,
      and log-probs are computed on first use (memoised) rather than precomputed.

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

    def setup(self, run: TrainingState) -> None:
        """Called by core once before the first step of every training run (a fresh copy of the method per
        run). Keep per-run state here (PDU's dual variable) and ``run`` itself, whose ``epoch``/``step``
        core keeps current; draw random numbers only from ``run.generator``. Default: nothing."""

    def log_state(self) -> dict[str, float]:
        """State to log after each optimizer step (train_log.jsonl, next to the loss parts). Default: none."""
        return {}

    def epoch_end(self, model, batches) -> None:
        """Called by core after every epoch (``run.epoch`` is still that epoch), in eval mode without grad:
        ``batches()`` iterates a fresh pass over this rank's training batches of the epoch (retain partners
        drawn anew), for state updated once per epoch (PDU's ``dual_update_upon="epoch"``). Default: nothing."""

    def loss(self, model, batch, ref):  # pragma: no cover - abstract
        raise NotImplementedError


def method_generator(seed: int):
    """The torch.Generator a method draws its random state from (RMU's control vector): seeded from the run
    seed alone, so every rank draws the same numbers, and never the global RNG (which core seeds for model
    initialisation and dropout). Distinct from the data-pairing and anchor-order streams."""
    import torch

    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 104_729)


@dataclass
class TrainingState:
    """What core hands ``Method.setup``: the run's seed, the method's own seeded generator, and where training
    is (``epoch`` 0-based, ``step`` = optimizer steps done, both updated by core before each micro-batch).
    ``record(key, value)`` keeps a value (e.g. a summary of drawn random state) in config.yaml's plan."""

    seed: int = 0
    world_size: int = 1
    epoch: int = 0
    step: int = 0
    generator: Any = None
    records: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.generator is None:
            self.generator = method_generator(self.seed)

    def record(self, key: str, value: Any) -> None:
        self.records[key] = value


def trainable_patterns(method) -> list[str] | None:
    """The ``trainable_params`` regexes of a method (a field holding a regex or a list of them), or ``None``
    when it has none: then every parameter is trained."""
    pats = getattr(method, "trainable_params", None)
    if pats is None:
        return None
    return [pats] if isinstance(pats, str) else [str(p) for p in pats]


def required_fields(cls) -> list[str]:
    """Hyper-parameters without a usable default (``field(default=None, metadata={"required": True})``)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("required")]


def check_required(method, where: str = "") -> None:
    """A required hyper-parameter that nothing set is one error line naming it and how to set it."""
    name = type(method).name
    for key in required_fields(type(method)):
        if getattr(method, key) is None:
            raise HarnessError(f"{where}method '{name}' needs {key} (it has no default): set methods.{name}.{key} "
                               f"in the task YAML or pass --set {name}.{key}=VALUE")


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
            kwargs[key] = _coerce(cls.name, key, raw, _prototype(cls, fields[key]))
    obj = cls(**kwargs)
    check_fields(obj)  # again: a subclass __post_init__ need not call the base's
    reference_of(obj)
    return obj


def _prototype(cls: type, f: dataclasses.Field) -> Any:
    """A value of the field's type to parse ``--set`` text against: its default, or for a required field
    (default ``None``) a zero of its annotated type (``float | None`` -> 0.0)."""
    if f.default is not None:
        return f.default
    for t in typing.get_args(_hints(cls).get(f.name)):
        if t in (bool, int, float):
            return t()
    return None


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
