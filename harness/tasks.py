"""Tasks: one benchmark setting per YAML file (``tasks/<family>/<name>.yaml``).

``include:`` merges maps recursively (child wins); files whose name starts with ``_`` are bases,
not tasks. Unknown keys are errors with a suggestion; a file that fails to parse is an error
naming it, never a silent skip.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import HarnessError

TASK_KEYS = ("task", "include", "tag", "version", "description", "model", "reference",
             "prompt", "data", "training", "metrics")
DATA_KEYS = ("path", "name", "split", "format")
TRAINING_KEYS = ("epochs", "lr", "batch_size", "per_device_batch", "warmup_epochs", "weight_decay",
                 "schedule", "optimizer", "max_length", "gradient_checkpointing", "max_grad_norm")


@dataclass(frozen=True)
class DataSpec:
    """A dataset split: hub id ``path``, config ``name``, ``split``. The bundled copy is the fallback."""

    path: str
    name: str | None = None
    split: str = "train"

    def label(self) -> str:
        return f"{self.path}" + (f"/{self.name}" if self.name else "") + f":{self.split}"


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

    @property
    def benchmark(self) -> str:
        """Name used for the open-unlearning export files (TOFU_EVAL.json, MUSE_EVAL.json)."""
        for t in self.tag:
            if t.lower() in ("tofu", "muse"):
                return t.upper()
        return (self.tag[0] if self.tag else self.name).upper()

    def data_spec(self, role: str) -> DataSpec:
        if role not in self.data:
            raise HarnessError(f"task '{self.name}' ({self.file}): no data role '{role}'; "
                               f"it declares {sorted(self.data)}")
        return self.data[role]

    def field_name(self, key: str) -> str:
        return self.prompt.get(key, key)

    def to_config(self) -> dict:
        return {"task": self.name, "version": self.version, "tag": self.tag, "model": self.model,
                "reference": self.reference, "prompt": self.prompt,
                "data": {k: vars(v) for k, v in self.data.items()},
                "training": self.training,
                "metrics": [[n, a] for n, a in self.metrics]}


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
    data = {}
    if not isinstance(doc["data"], dict):
        raise HarnessError(f"{path}: field 'data' must map role names to {{path, name, split}}")
    for role, spec in doc["data"].items():
        if not isinstance(spec, dict) or "path" not in spec:
            raise HarnessError(f"{path}: data.{role} needs at least 'path' (hub dataset id)")
        for k in spec:
            if k not in DATA_KEYS:
                raise HarnessError(f"{path}: data.{role}: unknown key '{k}'{suggest(k, DATA_KEYS)}")
        data[role] = DataSpec(str(spec["path"]), spec.get("name"), spec.get("split", "train"))
    training = doc.get("training") or {}
    for k in training:
        if k not in TRAINING_KEYS:
            raise HarnessError(f"{path}: training: unknown key '{k}'{suggest(k, TRAINING_KEYS)}")
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
                training=dict(training), metrics=metrics)


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
