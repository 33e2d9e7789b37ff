"""Tasks: one benchmark setting per YAML file (``tasks/<family>/<name>.yaml``).

``include:`` merges maps recursively (child wins); files whose name starts with ``_`` are bases,
not tasks. Unknown keys are errors with a suggestion; a file that fails to parse is an error
naming it, never a silent skip. Everything a benchmark family needs beyond its metrics is data here
(docs/tasks.md): the export name (``benchmark``), how unlearning data is built (``training.format``,
``training.idk``, ``data.<role>.tiny_fallback``), the report layout (``report``) and the recipe of
``harness finetune`` (``finetune``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import HarnessError

TASK_KEYS = ("task", "include", "tag", "version", "description", "benchmark", "model", "reference",
             "prompt", "data", "training", "metrics", "report", "finetune")
DATA_KEYS = ("path", "name", "split", "format")
ROLE_KEYS = (*DATA_KEYS, "tiny_fallback")
# format / idk say how the unlearning items are built; the rest is TrainConfig
DATA_BUILD_KEYS = ("format", "idk")
TRAINING_KEYS = ("epochs", "lr", "batch_size", "per_device_batch", "warmup_epochs", "weight_decay",
                 "schedule", "optimizer", "max_length", "gradient_checkpointing", "max_grad_norm",
                 *DATA_BUILD_KEYS)
FORMATS = ("qa", "corpus")
IDK_KEYS = ("role", "field")
REPORT_KEYS = ("title", "split", "split_order", "order", "columns", "published", "published_models", "plot")
PLOT_KEYS = ("x", "y", "log_x", "log_y", "y_max")
FINETUNE_KEYS = ("data", "splits")


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
    if isinstance(value, str):
        value = [value]
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
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    # export name (TOFU_EVAL.json, MUSE_EVAL.json); default: the first tag, else the task name, upper-cased
    benchmark: str = ""
    train_format: str = "qa"  # qa: prompt.question/answer items; corpus: prompt.text in max_length chunks
    idk: tuple[str, str] = ("idk", "text")  # (data role, field) of the "I don't know" answers
    # role -> split read instead when the declared one is unavailable, with the embedded tiny models only
    fallbacks: dict[str, DataSpec] = field(default_factory=dict)
    report: ReportLayout | None = None
    finetune: FinetuneRecipe | None = None

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

    def to_config(self) -> dict:
        """What the run hash sees. The report layout is left out (it changes no number); a tiny fallback
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
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read task file: {exc.strerror}") from None
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
    for req in ("data", "metrics"):
        if not doc.get(req):
            raise HarnessError(f"{path}: task '{name}' is missing required field '{req}'")
    tags = doc.get("tag") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    data, fallbacks = {}, {}
    if not isinstance(doc["data"], dict):
        raise HarnessError(f"{path}: field 'data' must map role names to {{path, name, split}}")
    for role, spec in doc["data"].items():
        if not isinstance(spec, dict) or "path" not in spec:
            raise HarnessError(f"{path}: data.{role} needs at least 'path' (hub dataset id)")
        for k in spec:
            if k not in ROLE_KEYS:
                raise HarnessError(f"{path}: data.{role}: unknown key '{k}'{suggest(k, ROLE_KEYS)}")
        data[role] = DataSpec(str(spec["path"]), spec.get("name"), spec.get("split", "train"))
        fb = spec.get("tiny_fallback")
        if fb is not None:
            _check_keys(f"{path}: data.{role}.tiny_fallback", fb, DATA_KEYS)
            fallbacks[role] = DataSpec(str(fb.get("path", spec["path"])), fb.get("name"), fb.get("split", "train"))
    training = dict(doc.get("training") or {})
    for k in training:
        if k not in TRAINING_KEYS:
            raise HarnessError(f"{path}: training: unknown key '{k}'{suggest(k, TRAINING_KEYS)}")
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
    metrics = []
    for m in doc["metrics"]:
        if isinstance(m, str):
            metrics.append((m, {}))
        elif isinstance(m, dict) and isinstance(m.get("name"), str):
            args = {k: v for k, v in m.items() if k != "name"}
            metrics.append((m["name"], args))
        else:
            raise HarnessError(f"{path}: each metrics entry must be a name or {{name: ..., <args>}}, got {m!r}")
    prompt = doc.get("prompt") or {}
    if not isinstance(prompt, dict):
        raise HarnessError(f"{path}: field 'prompt' must map keys (question, answer, ...) to data field names")
    return Task(name=name, file=path, tag=tags, version=int(doc.get("version", 1)),
                description=str(doc.get("description", "")), model=doc.get("model"),
                reference=doc.get("reference"), prompt=dict(prompt), data=data,
                training=training, metrics=metrics, benchmark=bench, train_format=train_format,
                idk=(str(idk.get("role", "idk")), str(idk.get("field", "text"))), fallbacks=fallbacks,
                report=report, finetune=finetune)


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
            if failures:
                msg += f"; plugins that failed to load: {'; '.join(failures)}"
            raise HarnessError(msg)
        for n in sorted(set(hits)):
            if n not in out:
                out.append(n)
    return out
