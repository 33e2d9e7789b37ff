"""Tasks: one benchmark setting per YAML file (``tasks/<family>/<name>.yaml``).

``include:`` merges maps recursively (child wins); files whose name starts with ``_`` are bases,
not tasks. Unknown keys are errors with a suggestion; a file that fails to parse is an error
naming it, never a silent skip; mistyped fields are errors naming the file and the field, and the
task name must be a safe path component (it names a results directory). Everything a benchmark family needs beyond its metrics is data here
(docs/tasks.md): the export name (``benchmark``), how unlearning data is built (``training.format``,
``training.idk``, ``data.<role>.tiny_fallback``), the report layout (``report``), ``harness finetune``'s recipe."""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import HarnessError
from harness.io import read_yaml
from harness.paths import safe_name
from harness.task_attack import AttackSpec, parse_attack

TASK_KEYS = ("task", "include", "tag", "version", "description", "benchmark", "model", "reference", "prompt",
             "data", "training", "methods", "metrics", "eval_metrics", "report", "finetune", "attack")
DATA_KEYS = ("path", "name", "split", "format")
TASK_FILE_FAILURE = "task file: "  # marks a task file's error among a registry's failures
# obtain: where to get a split that is not on the hub (said when it is missing; WMDP's corpora)
ROLE_KEYS = (*DATA_KEYS, "tiny_fallback", "obtain")
# path `text`: the HF text builder over a local file, one row {"text": line} per line (spec 2.8, WMDP)
TEXT_BUILDER = "text"
# format / idk say how the unlearning items are built; the rest is TrainConfig
DATA_BUILD_KEYS = ("format", "idk")
TRAINING_KEYS = ("epochs", "lr", "batch_size", "per_device_batch", "warmup_epochs", "weight_decay",
                 "schedule", "optimizer", "max_length", "gradient_checkpointing", "max_grad_norm",
                 "max_steps", "padding_side", *DATA_BUILD_KEYS)
FORMATS = ("qa", "corpus")
IDK_KEYS = ("role", "field")
REPORT_KEYS = ("title", "split", "split_order", "order", "columns", "published", "published_models", "plot")
PLOT_KEYS = ("x", "y", "log_x", "log_y", "y_max")
FINETUNE_KEYS = ("data", "splits")
# methods.<name>.training may override these for that method (the data-build keys stay task-wide)
METHOD_TRAINING_KEYS = tuple(k for k in TRAINING_KEYS if k not in DATA_BUILD_KEYS)


@dataclass(frozen=True)
class DataSpec:
    """A dataset split: hub id ``path``, config ``name``, ``split``. The bundled copy is the fallback."""

    path: str
    name: str | None = None
    split: str = "train"

    def label(self) -> str:
        return f"{self.path}" + (f"/{self.name}" if self.name else "") + f":{self.split}"

    def to_dict(self) -> dict:
        return {"path": self.path, "name": self.name, "split": self.split}


@dataclass(frozen=True)
class ResolvedSpec(DataSpec):
    """A split pinned to the one place a run reads it from (``harness.data.splits.resolve_source``):
    ``hub``, ``bundled:<file under harness/bundled>`` or ``data_dir:<file under --data-dir>``."""

    source: str = ""


def _check_keys(where: str, doc, allowed) -> None:
    if not isinstance(doc, dict):
        raise HarnessError(f"{where}: expected a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in allowed:
            raise HarnessError(f"{where}: unknown key '{k}'{suggest(str(k), allowed)}; valid keys: {', '.join(allowed)}")


def _str_list(where: str, value) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


@dataclass
class ReportLayout:
    """Where a task's results go in ``harness report``: tasks of one ``benchmark`` that name their ``split``
    share a table whose column groups are those splits (ordered by ``split_order``), each with ``columns``.
    A task without ``split`` (e.g. one of your own built on the TOFU base) keeps a table of its own."""

    title: str
    split: str | None
    split_order: tuple[str, ...] = ()
    order: int = 100  # tables sort by (order, benchmark)
    columns: tuple[str, ...] = ()  # empty: every metric the runs reported
    published: tuple[str, ...] = ()  # CSV files under harness/bundled/published
    published_models: dict[str, str] = field(default_factory=dict)  # our model label -> published name
    plot: dict | None = None  # {x, y, log_x, log_y, y_max}

    def to_dict(self) -> dict:
        return {"title": self.title, "split": self.split, "split_order": list(self.split_order),
                "order": self.order, "columns": list(self.columns), "published": list(self.published),
                "published_models": dict(self.published_models), "plot": self.plot}

    @classmethod
    def from_dict(cls, doc, where: str, *, title: str) -> ReportLayout:
        """``where`` names the file for errors (a task YAML, or the scores.json that recorded it)."""
        _check_keys(where, doc, REPORT_KEYS)
        plot = doc.get("plot")
        if plot is not None:
            _check_keys(f"{where} plot", plot, PLOT_KEYS)
            for k in ("x", "y"):
                if not isinstance(plot.get(k), str):
                    raise HarnessError(f"{where} plot: '{k}' must name a metric")
        models = doc.get("published_models") or {}
        if not isinstance(models, dict):
            raise HarnessError(f"{where} published_models: expected a mapping of model label -> published name")
        order = doc.get("order", 100)
        if not isinstance(order, int) or isinstance(order, bool):
            raise HarnessError(f"{where} order: expected an integer, got {order!r}")
        split = doc.get("split")
        return cls(title=str(doc.get("title") or title), split=str(split) if split is not None else None,
                   split_order=_str_list(f"{where} split_order", doc.get("split_order") or []), order=order,
                   columns=_str_list(f"{where} columns", doc.get("columns") or []),
                   published=_str_list(f"{where} published", doc.get("published") or []),
                   published_models={str(k): str(v) for k, v in models.items()},
                   plot=dict(plot) if plot is not None else None)


@dataclass(frozen=True)
class FinetuneRecipe:
    """``harness finetune --split S`` trains on config ``S`` of dataset ``path`` (split ``split``)."""

    path: str
    split: str
    splits: tuple[str, ...]

    def spec(self, name: str) -> DataSpec:
        return DataSpec(self.path, name, self.split)


@dataclass
class Task:
    name: str
    file: Path
    tag: list[str] = field(default_factory=list)
    version: int = 1
    description: str = ""
    model: str | None = None
    reference: str | None = None
    prompt: dict[str, str] = field(default_factory=dict)
    data: dict[str, DataSpec] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # method name -> {"params": hyper-parameters, "training": TrainConfig overrides}: this task's defaults
    # for that method (the published per-benchmark values), applied over the method's class defaults
    methods: dict[str, dict[str, dict]] = field(default_factory=dict)
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    # export name (TOFU_EVAL.json, MUSE_EVAL.json); default: the first tag, else the task name, upper-cased
    benchmark: str = ""
    train_format: str = "qa"  # qa: prompt.question/answer items; corpus: prompt.text in max_length chunks
    idk: tuple[str, str] = ("idk", "text")  # (data role, field) of the "I don't know" answers
    # role -> split read instead when the declared one is unavailable, with the embedded tiny models only
    fallbacks: dict[str, DataSpec] = field(default_factory=dict)
    obtain: dict[str, str] = field(default_factory=dict)  # role -> where to get its data (missing-data errors)
    report: ReportLayout | None = None
    finetune: FinetuneRecipe | None = None
    attack: AttackSpec | None = None  # what --attacks scores again; in the run hash only with --attacks
    eval_metrics: tuple[str, ...] = ()  # --eval-every's default subset (in the hash only with --keep-best)

    def __post_init__(self):
        if not self.benchmark:
            self.benchmark = _default_benchmark(self.name, self.tag)

    def data_spec(self, role: str) -> DataSpec:
        if role not in self.data:
            raise HarnessError(f"task '{self.name}' ({self.file}): no data role '{role}'; "
                               f"it declares {sorted(self.data)}")
        return self.data[role]

    def field_name(self, key: str) -> str:
        return self.prompt.get(key, key)

    def method_defaults(self, method: str) -> tuple[dict, dict]:
        """``(hyper-parameters, training overrides)`` this task sets for ``method`` (empty when none)."""
        entry = self.methods.get(method) or {}
        return dict(entry.get("params") or {}), dict(entry.get("training") or {})

    def to_config(self) -> dict:
        """What the run hash sees. The report layout is left out (it changes no number); nor are the
        per-method defaults (``methods``): a run records the resolved hyper-parameters and training
        settings they produce, so only the ones the run uses count. A tiny fallback
        that is used shows in the run's ``data_sources``. ``benchmark`` and ``training_data`` appear only
        where they differ from their defaults, so tasks that keep the defaults keep their hashes."""
        out = {"task": self.name, "version": self.version, "tag": self.tag, "model": self.model,
               "reference": self.reference, "prompt": self.prompt,
               "data": {k: v.to_dict() for k, v in self.data.items()},
               "training": self.training,
               "metrics": [[n, a] for n, a in self.metrics]}
        if self.benchmark != _default_benchmark(self.name, self.tag):
            out["benchmark"] = self.benchmark
        if (self.train_format, self.idk) != ("qa", ("idk", "text")):
            out["training_data"] = {"format": self.train_format, "idk": {"role": self.idk[0], "field": self.idk[1]}}
        return out


def _default_benchmark(name: str, tags: list[str]) -> str:
    return (tags[0] if tags else name).upper()


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _load_yaml(path: Path) -> dict:
    doc = read_yaml(path, what="task file")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise HarnessError(f"{path}: a task file must be a mapping, got {type(doc).__name__}")
    return doc


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_includes(path: Path, _stack: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise HarnessError(f"{_stack[0]}: include cycle ({chain})")
    doc = _load_yaml(path)
    for key in doc:
        if key not in TASK_KEYS:
            raise HarnessError(f"{path}: unknown key '{key}'{suggest(key, TASK_KEYS)}; valid keys: {', '.join(TASK_KEYS)}")
    inc = doc.pop("include", None)
    if inc is None:
        return doc
    merged: dict = {}
    for name in [inc] if isinstance(inc, str) else list(inc):
        target = (path.parent / str(name)).resolve()
        if not target.is_file():
            raise HarnessError(f"{path}: include '{name}' not found (looked for {target})")
        merged = _merge(merged, resolve_includes(target, (*_stack, path)))
    return _merge(merged, doc)


def parse_task(path: Path) -> Task:
    path = Path(path)
    doc = resolve_includes(path)
    if "task" not in doc:
        raise HarnessError(f"{path}: missing required field 'task' (the task name)")
    name = doc["task"]
    if not isinstance(name, str) or not name:
        raise HarnessError(f"{path}: field 'task' must be a non-empty string")
    safe_name(name, f"{path}: field 'task'")
    for req in ("data", "metrics"):
        if not doc.get(req):
            raise HarnessError(f"{path}: task '{name}' is missing required field '{req}'")
    tags = _tags(path, doc.get("tag"))
    data, fallbacks, obtain = {}, {}, {}
    if not isinstance(doc["data"], dict):
        raise HarnessError(f"{path}: field 'data' must map role names to {{path, name, split}}")
    for role, spec in doc["data"].items():
        if not isinstance(spec, dict) or "path" not in spec:
            raise HarnessError(f"{path}: data.{role} needs at least 'path' (hub dataset id)")
        for k in spec:
            if k not in ROLE_KEYS:
                raise HarnessError(f"{path}: data.{role}: unknown key '{k}'{suggest(k, ROLE_KEYS)}")
        data[role] = DataSpec(str(spec["path"]), spec.get("name"), spec.get("split", "train"))
        if spec.get("obtain") is not None:
            obtain[role] = str(spec["obtain"]).strip()
        fb = spec.get("tiny_fallback")
        if fb is not None:
            _check_keys(f"{path}: data.{role}.tiny_fallback", fb, DATA_KEYS)
            fallbacks[role] = DataSpec(str(fb.get("path", spec["path"])), fb.get("name"), fb.get("split", "train"))
    training = _training(path, doc.get("training"))
    train_format = training.pop("format", "qa")
    if train_format not in FORMATS:
        raise HarnessError(f"{path}: training.format: {train_format!r} is not one of {', '.join(FORMATS)}")
    idk = training.pop("idk", None) or {}
    _check_keys(f"{path}: training.idk", idk, IDK_KEYS)
    benchmark = doc.get("benchmark") or ""
    if benchmark and not re.fullmatch(r"[A-Za-z0-9_.-]+", str(benchmark)):
        raise HarnessError(f"{path}: benchmark {benchmark!r}: use letters, digits, '_', '-', '.' (it names files)")
    bench = str(benchmark) or _default_benchmark(name, tags)
    report = None
    if doc.get("report") is not None:
        report = ReportLayout.from_dict(doc["report"], f"{path}: report", title=bench)
    finetune = None
    if doc.get("finetune") is not None:
        ft = doc["finetune"]
        _check_keys(f"{path}: finetune", ft, FINETUNE_KEYS)
        ft_data = ft.get("data")
        _check_keys(f"{path}: finetune.data", ft_data if ft_data is not None else {}, ("path", "split"))
        if not ft_data or "path" not in ft_data:
            raise HarnessError(f"{path}: finetune.data needs 'path' (hub dataset id; --split picks its config)")
        splits = _str_list(f"{path}: finetune.splits", ft.get("splits") or [])
        if not splits:
            raise HarnessError(f"{path}: finetune.splits: name at least one split")
        finetune = FinetuneRecipe(str(ft_data["path"]), str(ft_data.get("split", "train")), splits)
    return Task(name=name, file=path, tag=tags, version=_version(path, doc.get("version", 1)),
                description=_optional_str(path, "description", doc.get("description")) or "",
                model=_optional_str(path, "model", doc.get("model")),
                reference=_optional_str(path, "reference", doc.get("reference")),
                prompt=_prompt(path, doc.get("prompt")), data=data,
                training=training, methods=_methods(path, doc.get("methods")),
                metrics=_metrics(path, doc["metrics"]), benchmark=bench, train_format=train_format,
                idk=(str(idk.get("role", "idk")), str(idk.get("field", "text"))), fallbacks=fallbacks, obtain=obtain,
                report=report, finetune=finetune, attack=parse_attack(path, doc.get("attack"), data),
                eval_metrics=_str_list(f"{path}: eval_metrics", doc.get("eval_metrics") or []))


# ------------------------------------------------------------------------------ field types
# Each check names the file and the field; values are kept as written (they enter the run hash).

def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _tags(path: Path, raw) -> list[str]:
    tags = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise HarnessError(f"{path}: field 'tag' must be a string or a list of strings, got {raw!r}")
    for t in tags:  # a tag can name the export files (<TAG>_EVAL.json)
        safe_name(t, f"{path}: field 'tag'")
    return list(tags)


def _version(path: Path, raw) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise HarnessError(f"{path}: field 'version' must be an integer, got {raw!r} ({_kind(raw)})")
    return raw


def _optional_str(path: Path, key: str, raw) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise HarnessError(f"{path}: field '{key}' must be a string, got {raw!r} ({_kind(raw)})")
    return raw


def _prompt(path: Path, raw) -> dict[str, str]:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: field 'prompt' must map keys (question, answer, ...) to data field names")
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise HarnessError(f"{path}: prompt.{k} must be a string (a data field name), got {v!r} ({_kind(v)})")
    return dict(raw)


def _metrics(path: Path, raw) -> list[tuple[str, dict]]:
    if not isinstance(raw, list):
        raise HarnessError(f"{path}: field 'metrics' must be a list of metric names or {{name: ..., <args>}} maps, "
                           f"got {_kind(raw)} {raw!r}")
    metrics = []
    for m in raw:
        if isinstance(m, str) and m:
            metrics.append((m, {}))
        elif isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"] and all(isinstance(k, str) for k in m):
            metrics.append((m["name"], {k: v for k, v in m.items() if k != "name"}))
        else:
            raise HarnessError(f"{path}: each metrics entry must be a name or {{name: ..., <args>}}, got {m!r}")
    return metrics


def _number(path: Path, key: str, v, *, integer: bool = False, positive: bool = True) -> None:
    field_ = f"{path}: training.{key}"
    if isinstance(v, str):
        hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if "e" in v.lower() and _parses_as_float(v) else ""
        raise HarnessError(f"{field_} must be a number, got the string {v!r}{hint}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HarnessError(f"{field_} must be a number, got {v!r} ({_kind(v)})")
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
        raise HarnessError(f"{path}: training.{key} must be true or false, got {v!r} ({_kind(v)})")


def _word(path: Path, key: str, v) -> None:
    if not isinstance(v, str) or not v:
        raise HarnessError(f"{path}: training.{key} must be a name (string), got {v!r} ({_kind(v)})")


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


def _training(path: Path, raw, *, where: str = "training", keys: tuple[str, ...] = TRAINING_KEYS) -> dict[str, Any]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: field '{where}' must be a mapping of hyper-parameters, got {_kind(raw)} {raw!r}")
    for k, v in raw.items():
        if k not in keys:
            raise HarnessError(f"{path}: {where}: unknown key '{k}'{suggest(str(k), keys)}; valid: {', '.join(keys)}")
        try:
            TRAINING_CHECKS.get(k, lambda *_: None)(path, k, v)
        except HarnessError as exc:  # the checks name "training.<key>"; say which block it was
            raise HarnessError(str(exc).replace(f"training.{k}", f"{where}.{k}")) from None
    return dict(raw)


def _methods(path: Path, raw) -> dict[str, dict[str, dict]]:
    """``methods: {pdu: {retain_loss_eps: 0.3}, undial: {training: {lr: 1.0e-4, epochs: 10}}}``.

    Hyper-parameter names are checked against the method when a run builds it (the task schema sits
    below the method registry); here: the shape, and the training keys with the task's own checks."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: field 'methods' must map method names to their defaults, got {_kind(raw)} {raw!r}")
    out = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not name:
            raise HarnessError(f"{path}: methods: each key must be a method name, got {name!r}")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise HarnessError(f"{path}: methods.{name} must map hyper-parameter names to values, got {entry!r}")
        for k, v in entry.items():
            if k != "training" and isinstance(v, float) and not math.isfinite(v):
                raise HarnessError(f"{path}: methods.{name}.{k} must be a finite number, got {v}")
        params = {k: v for k, v in entry.items() if k != "training"}
        training = _training(path, entry.get("training"), where=f"methods.{name}.training", keys=METHOD_TRAINING_KEYS)
        out[name] = {"params": params, "training": training}
    return out


def task_files(directory: Path) -> list[Path]:
    """Task YAML files under ``directory`` (recursively), bases (``_*.yaml``) excluded."""
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        raise HarnessError(f"task directory not found: {directory}")
    return sorted(p for p in directory.rglob("*.y*ml") if p.suffix in (".yaml", ".yml") and not p.name.startswith("_"))


def select(patterns: str | list[str], items: dict[str, Any], *, kind: str, tags_of=None,
           failures: list[str] | None = None) -> list[str]:
    """Expand comma lists, fnmatch patterns and tags into names, in a stable order.

    An unknown name is an error with "did you mean" and the available names.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in items if fnmatch.fnmatchcase(n, pat)]
        if tags_of is not None:
            hits += [n for n in items if any(fnmatch.fnmatchcase(t, pat) for t in tags_of(items[n]))]
        if not hits:
            msg = f"unknown {kind} '{pat}'{suggest(pat, items)}; available: {', '.join(sorted(items)) or '(none)'}"
            plugins = [f for f in failures or () if not f.startswith(TASK_FILE_FAILURE)]
            files = [f[len(TASK_FILE_FAILURE):] for f in failures or () if f.startswith(TASK_FILE_FAILURE)]
            if plugins:
                msg += f"; plugins that failed to load: {'; '.join(plugins)}"
            if files:
                msg += f"; task files that failed to load: {'; '.join(files)}"
            raise HarnessError(msg)
        for n in sorted(set(hits)):
            if n not in out:
                out.append(n)
    return out
