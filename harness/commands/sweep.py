"""Sweep points of ``harness run``: comma lists in ``--lr``, ``--epochs`` and ``--set METHOD.FIELD=a,b`` and
the lists of a ``--sweep`` YAML file expand into the cartesian product of their values.

Order is stable: the training keys first (lr, epochs, train_batch_size, optimizer), then each method's
fields in the order they were first given (the file before ``--set``); values keep their given order.
A method's points combine the training axes with its own fields only. Every value is parsed against its
type here, before any model is touched, and a bad one is a one-line error naming its key and source.

Sweep file::

    lr: [1e-5, 2e-5, 5e-5]
    epochs: [5, 10]
    npo.beta: [0.05, 0.1]      # or nested:  npo: {beta: [0.05, 0.1], alpha: 1}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from harness import HarnessError
from harness.methods import build_method
from harness.options import RunOptions, numbers
from harness.tasks import suggest

# sweepable training keys -> (flag, whole number?); optimizer takes names
TRAIN_KEYS = {"lr": ("--lr", False), "epochs": ("--epochs", True), "train_batch_size": ("--train-batch-size", True),
              "optimizer": ("--optimizer", None)}


@dataclass(frozen=True)
class Axis:
    key: str  # "lr", "epochs", ... or "<method>.<field>"
    values: tuple
    source: str  # what an error names: "--lr", "--set npo.beta", "sweep.yaml"

    @property
    def method(self) -> str | None:
        return self.key.partition(".")[0] if "." in self.key else None


def axes(opts: RunOptions, selected: dict[str, type], registered: dict[str, type]) -> list[Axis]:
    """Every axis of the grid (a single value is an axis of one), values already typed and checked."""
    found: dict[str, Axis] = {}

    def add(axis: Axis) -> None:
        if axis.key in found:
            raise HarnessError(f"{axis.key} is given twice ({found[axis.key].source} and {axis.source}); give it once")
        found[axis.key] = axis

    if opts.sweep:
        for axis in _file_axes(opts.sweep, selected, registered):
            add(axis)
    for key in ("lr", "epochs"):
        raw = getattr(opts, key)
        if raw is not None:
            flag, whole = TRAIN_KEYS[key]
            add(Axis(key, tuple(_train_values(flag, key, raw, whole)), flag))
    for s in opts.set:
        key, eq, value = s.partition("=")
        meth, dot, fld = key.partition(".")
        if not eq or not dot or not fld:
            raise HarnessError(f"--set {s!r}: expected METHOD.FIELD=VALUE, e.g. npo.beta=0.2 (a sweep: npo.beta=0.1,0.2)")
        if meth not in selected:
            raise HarnessError(f"--set {s!r}: method '{meth}' is not selected (selected: {', '.join(selected)})")
        parts = [v.strip() for v in value.split(",")]
        if "" in parts:
            raise HarnessError(f"--set {s!r}: empty value (stray comma)")
        add(Axis(key, tuple(_method_values(f"--set {key}=", selected[meth], fld, parts)), f"--set {key}"))
    for key in ("train_batch_size", "optimizer"):
        if key in found and getattr(opts, key) is not None:
            raise HarnessError(f"{key} is given twice ({found[key].source} and {TRAIN_KEYS[key][0]}); give it once")
    training = [found[k] for k in TRAIN_KEYS if k in found]
    return training + [a for a in found.values() if a.method]


def points(grid: list[Axis], method: str) -> list[dict]:
    """The points of ``method``: one dict key -> value per combination, in stable order."""
    mine = [a for a in grid if a.method in (None, method)]
    return [dict(zip((a.key for a in mine), combo)) for combo in itertools.product(*(a.values for a in mine))]


def swept(grid: list[Axis]) -> set[str]:
    """Keys with more than one value: what tells the points of one method apart."""
    return {a.key for a in grid if len(a.values) > 1}


def row_names(cells: list) -> dict[int, str]:
    """id(cell) -> its method, with the sweep values that tell it from the task's other cells of that
    method (``npo {lr=0.001, npo.beta=0.1}``), so the printed rows of a sweep can be told apart."""
    groups: dict[tuple[str, str], list] = {}
    for c in cells:
        groups.setdefault((c.task.name, c.method_name), []).append(c)
    out = {}
    for group in groups.values():
        keys = [k for k in dict.fromkeys(k for c in group for k in c.point)
                if len({repr(c.point.get(k)) for c in group}) > 1]
        for c in group:
            text = "{" + ", ".join(f"{k}={c.point.get(k)}" for k in keys) + "}"
            out[id(c)] = c.method_name + (f" {text}" if keys else "")
    return out


def training_part(point: dict) -> dict:
    return {k: v for k, v in point.items() if "." not in k}


def method_part(point: dict, method: str) -> dict:
    prefix = method + "."
    return {k[len(prefix):]: v for k, v in point.items() if k.startswith(prefix)}


def _train_values(where: str, key: str, raw, whole: bool | None) -> list:
    if whole is None:  # optimizer names
        values = [str(v).strip() for v in (raw if isinstance(raw, list) else [raw])]
        if "" in values or len(set(values)) != len(values):
            raise HarnessError(f"{where}: {key} needs distinct non-empty names, got {raw!r}")
        return values
    if isinstance(raw, list) and any(isinstance(v, bool) or not isinstance(v, (int, float, str)) for v in raw):
        raise HarnessError(f"{where}: {key} must be numbers, got {raw!r}")
    values = numbers(where, raw, integer=whole, key=key)
    return [int(v) if whole else v for v in values]


def _method_values(where: str, cls: type, fld: str, raw: list) -> list:
    """Each value coerced by ``build_method`` (the one parser of hyper-parameters); duplicates are errors."""
    out = []
    for value in raw:
        try:
            typed = getattr(build_method(cls, {fld: value}), fld)
        except HarnessError as exc:
            if len(raw) == 1 and where.startswith("--set"):  # one value: the message as before the sweeps
                raise
            raise HarnessError(f"{where}{value}: {exc}") from None
        if typed in out:
            raise HarnessError(f"{where}{value}: {cls.name}.{fld} value {value!r} is given more than once")
        out.append(typed)
    return out


def _file_axes(path: str, selected: dict[str, type], registered: dict[str, type]) -> list[Axis]:
    from harness.io import read_yaml

    doc = read_yaml(path, what="sweep file")
    if not isinstance(doc, dict) or not doc:
        raise HarnessError(f"{path}: a sweep file maps keys (lr, epochs, METHOD.FIELD) to lists of values")
    flat: list[tuple[str, object]] = []
    for key, value in doc.items():
        key = str(key)
        if isinstance(value, dict):  # npo: {beta: [...]}
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((key, value))
    out = []
    for key, value in flat:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise HarnessError(f"{path}: {key}: empty list; give at least one value")
        where = f"{path}: {key}"
        if "." not in key:
            if key not in TRAIN_KEYS:
                valid = ", ".join([*TRAIN_KEYS, "METHOD.FIELD"])
                raise HarnessError(f"{where}: unknown key{suggest(key, TRAIN_KEYS)}; valid: {valid}")
            out.append(Axis(key, tuple(_train_values(where, key, list(values), TRAIN_KEYS[key][1])), path))
            continue
        meth, _, fld = key.partition(".")
        if meth not in registered:
            raise HarnessError(f"{where}: unknown method '{meth}'{suggest(meth, registered)}")
        if meth not in selected:  # one sweep file may serve several runs: other methods' keys wait their turn
            continue
        if any(isinstance(v, (dict, list)) for v in values):
            raise HarnessError(f"{where}: values must be scalars, got {value!r}")
        out.append(Axis(key, tuple(_method_values(f"{where}=", selected[meth], fld, values)), path))
    return out
