"""Plugin loading and the registry of methods, metrics, tasks and attacks.

Load order: built-ins listed in registry.yaml, then installed entry points (group
``unlearn_harness``), then loose files from ``--plugins-dir``. Built-ins go through the same
hooks as third-party plugins. A plugin that fails to import or register, or registers something
of the wrong kind (not a Method dataclass, not a Metric, not an existing task path, a name that is
not a safe path component), is skipped with a one-line warning naming it; a task file that does
not load hides only itself, with a warning naming the file (``HARNESS_STRICT_PLUGINS=1`` and
``harness validate`` raise instead). A name registered twice is an error naming both sources.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from harness import PROJECT, HarnessError, __version__, hookimpl, hookspec
from harness.io import read_yaml
from harness.paths import builtin_root, safe_name
from harness.tasks import TASK_FILE_FAILURE, parse_task, task_files

log = logging.getLogger("harness")


class HookSpecs:
    @hookspec
    def register_methods(self, register):
        """Call ``register(MethodClass)`` for each unlearning method (a ``harness.methods.Method`` dataclass)."""

    @hookspec
    def register_metrics(self, register):
        """Call ``register(metric)`` for each ``harness.metrics.Metric``."""

    @hookspec
    def register_tasks(self, register):
        """Call ``register(path)`` with a task YAML file or a directory of them."""

    @hookspec
    def register_attacks(self, register):
        """Call ``register(AttackClass)`` for each attack (a ``harness.attacks.Attack`` dataclass)."""


@dataclass
class PluginInfo:
    name: str
    source: str  # builtin | entrypoint | plugins-dir | in-process
    dist: str | None = None
    version: str | None = None
    status: str = "loaded"
    error: str | None = None
    provides: list[str] = field(default_factory=list)


@dataclass
class Registry:
    methods: dict[str, type] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, type] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    task_errors: list[str] = field(default_factory=list)  # task files that did not load (lenient mode)

    @property
    def failures(self) -> list[str]:
        return ([f"{p.name}: {p.error}" for p in self.plugins if p.status == "failed"]
                + [TASK_FILE_FAILURE + e for e in self.task_errors])

    def add(self, kind: str, name: str, obj: Any, source: str) -> None:
        table = getattr(self, kind)
        if not isinstance(name, str) or not name:
            raise HarnessError(f"plugin '{source}' registered a {kind[:-1]} without a name: {obj!r}")
        if name in table:
            raise HarnessError(f"{kind[:-1]} '{name}' is registered twice: by '{self.sources[(kind, name)]}' and by '{source}'")
        table[name] = obj
        self.sources[(kind, name)] = source


def strict_mode() -> bool:
    return os.environ.get("HARNESS_STRICT_PLUGINS", "") not in ("", "0", "false")


def _load_file_module(path: Path, prefix: str) -> ModuleType:
    # two loose files of the same name in different folders are different plugins
    where = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    modname = f"{prefix}_{path.stem}_{where}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[modname]
        raise
    return mod


def read_registry_file() -> dict:
    path = builtin_root() / "registry.yaml"
    doc = read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise HarnessError(f"{path}: must be a mapping with plugins/tasks/models")
    return doc


class BadRegistration(Exception):
    """A plugin handed ``register`` something of the wrong kind; reported as that plugin's failure."""


def _in_mro(obj_type: type, module: str, name: str) -> bool:
    # by name, not by import: the registry sits below harness.methods / harness.metrics
    return any(c.__name__ == name and c.__module__ == module for c in getattr(obj_type, "__mro__", ()))


def check_method(item) -> str:
    """The name of a valid method class; BadRegistration otherwise."""
    if not (isinstance(item, type) and _in_mro(item, "harness.methods", "Method")):
        raise BadRegistration(f"register_methods registered {item!r}, not a subclass of harness.methods.Method")
    fields = {f.name for f in dataclasses.fields(item)} if dataclasses.is_dataclass(item) else set()
    # annotations of the class itself that are not fields: it forgot @dataclass, so --set and the run
    # hash would silently miss those hyper-parameters
    missed = [k for k, a in vars(item).get("__annotations__", {}).items()
              if k not in fields and "ClassVar" not in str(a)]
    if missed or not dataclasses.is_dataclass(item):
        raise BadRegistration(f"register_methods registered {item.__name__}, which is not a @dataclass "
                              f"(hyper-parameters {', '.join(missed) or '(none)'} would be ignored)")
    name = getattr(item, "name", None)
    try:
        return safe_name(name, f"method {item.__name__}.name")
    except HarnessError as exc:
        raise BadRegistration(str(exc)) from None


def check_attack(item) -> str:
    """The name of a valid attack class (a ``harness.attacks.Attack`` dataclass); BadRegistration otherwise."""
    if not (isinstance(item, type) and _in_mro(item, "harness.attacks", "Attack") and dataclasses.is_dataclass(item)):
        raise BadRegistration(f"register_attacks registered {item!r}, not a @dataclass subclass of "
                              "harness.attacks.Attack")
    try:
        return safe_name(getattr(item, "name", None), f"attack {item.__name__}.name")
    except HarnessError as exc:
        raise BadRegistration(str(exc)) from None


def check_metric(item) -> str:
    if not _in_mro(type(item), "harness.metrics", "Metric"):
        raise BadRegistration(f"register_metrics registered {item!r}, not a harness.metrics.Metric "
                              "(decorate the function with @metric and register fn.metric)")
    if not isinstance(item.name, str) or not item.name or not callable(item.fn):
        raise BadRegistration(f"register_metrics registered a Metric without a name or function: {item!r}")
    return item.name


class _Loader:
    def __init__(self, strict: bool):
        self.strict = strict
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.reg = Registry()
        self.pending: list[tuple[Any, PluginInfo]] = []

    def fail(self, info: PluginInfo, exc: BaseException) -> None:
        text = str(exc) if isinstance(exc, BadRegistration) else f"{type(exc).__name__}: {exc}"
        info.status, info.error = "failed", (text.splitlines() or [""])[0]
        if self.strict:
            raise HarnessError(f"plugin '{info.name}' failed: {info.error}") from exc
        log.warning("skipping plugin '%s' (%s): %s", info.name, info.source, info.error)

    def load(self, info: PluginInfo, importer) -> None:
        self.reg.plugins.append(info)
        try:
            obj = importer()
            self.pm.register(obj, name=info.name)
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError:
                self.pm.unregister(obj)
                raise
        except HarnessError:
            raise
        except BaseException as exc:  # a broken plugin must not break the harness
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.fail(info, exc)
            return
        self.pending.append((obj, info))

    def bad_task_file(self, error: HarnessError) -> None:
        """A task file that does not load hides only itself (its message names it); strict: an error."""
        if self.strict:
            raise error
        self.reg.task_errors.append(one_line(error))
        log.warning("skipping task file: %s", one_line(error))

    def task_paths(self, item, info: PluginInfo) -> list[Path]:
        if not isinstance(item, (str, os.PathLike)):
            raise BadRegistration(f"register_tasks registered {item!r}, not a path to a task file or directory")
        p = Path(item)
        if not p.exists():
            if info.source == "include-tasks":  # the user's own flag: a typo is an error, not a warning
                raise HarnessError(f"--include-tasks {p}: no such file or directory")
            raise BadRegistration(f"register_tasks registered {p}, which does not exist")
        return task_files(p)

    def stage(self, kind: str, item, info: PluginInfo, staged: list) -> None:
        if kind == "methods":
            staged.append((check_method(item), item))
        elif kind == "metrics":
            staged.append((check_metric(item), item))
        elif kind == "attacks":
            staged.append((check_attack(item), item))
        else:
            for f in self.task_paths(item, info):
                try:
                    t = parse_task(f)
                except HarnessError as exc:
                    self.bad_task_file(exc)
                    continue
                staged.append((t.name, t))

    def register_all(self) -> Registry:
        for obj, info in self.pending:
            for hook, kind in (("register_methods", "methods"), ("register_metrics", "metrics"),
                               ("register_tasks", "tasks"), ("register_attacks", "attacks")):
                impl = getattr(obj, hook, None)
                if impl is None or not hasattr(impl, f"{PROJECT}_impl"):
                    continue
                staged: list[tuple[str, Any]] = []
                try:
                    impl(register=lambda item, _k=kind, _s=staged, _i=info: self.stage(_k, item, _i, _s))
                except HarnessError:
                    raise
                except Exception as exc:
                    self.fail(info, exc)
                    break
                for name, item in staged:
                    self.reg.add(kind, name, item, info.name)
                    info.provides.append(f"{kind[:-1]}:{name}")
        return self.reg


def _expand(entries) -> list[str]:
    out = []
    for entry in entries:
        if entry.endswith(".*"):
            import pkgutil

            pkg = importlib.import_module(entry[:-2])
            out += sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                          if not m.name.startswith("_"))
        else:
            out.append(entry)
    return out


def _builtin_importer(entry: str):
    def imp():
        if entry.endswith(".py"):
            return _load_file_module(builtin_root() / entry, "harness_builtin_" + Path(entry).parent.name)
        return importlib.import_module(entry)

    return imp


class _TaskDirPlugin:
    """Registers task directories (registry.yaml ``tasks:`` and ``--include-tasks``)."""

    def __init__(self, dirs):
        self.dirs = dirs

    @hookimpl
    def register_tasks(self, register):
        for d in self.dirs:
            register(d)


def _task_dir_plugin(dirs):
    return _TaskDirPlugin(dirs)


def build_registry(*, plugins_dirs=(), include_tasks=(), strict: bool | None = None,
                   extra_plugins=(), entry_points: bool = True) -> Registry:
    strict = strict_mode() if strict is None else strict
    loader = _Loader(strict)
    doc = read_registry_file()
    for entry in _expand(doc.get("plugins", [])):
        loader.load(PluginInfo(f"builtin:{entry}", "builtin", "unlearn-harness", __version__), _builtin_importer(entry))
    task_dirs = [builtin_root() / d for d in doc.get("tasks", [])]
    loader.load(PluginInfo("builtin:tasks", "builtin", "unlearn-harness", __version__), lambda: _task_dir_plugin(task_dirs))
    if entry_points:
        allow = os.environ.get("HARNESS_PLUGINS")
        allowed = None if allow is None else {_norm(a) for a in allow.split(",") if a.strip()}
        for ep in sorted(md.entry_points(group=PROJECT), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else None
            info = PluginInfo(ep.name, "entrypoint", dist, ep.dist.version if ep.dist else None)
            if allowed is not None and _norm(dist or "") not in allowed and _norm(ep.name) not in allowed:
                # listed (not loaded) so `harness ls plugins` shows why an installed plugin is absent
                info.status, info.error = "disabled", f"not in HARNESS_PLUGINS={allow!r}"
                loader.reg.plugins.append(info)
                continue
            loader.load(info, ep.load)
    for d in plugins_dirs:
        d = Path(d)
        if not d.is_dir():
            raise HarnessError(f"--plugins-dir {d}: not a directory")
        for f in sorted(d.glob("*.py")):
            loader.load(PluginInfo(f"{d.name}/{f.name}", "plugins-dir"),
                        lambda f=f: _load_file_module(f, "harness_plugins_dir"))
    for i, obj in enumerate(extra_plugins):
        loader.load(PluginInfo(getattr(obj, "__name__", f"in-process-{i}"), "in-process"), lambda obj=obj: obj)
    if include_tasks:
        loader.load(PluginInfo("--include-tasks", "include-tasks"), lambda: _task_dir_plugin([Path(d) for d in include_tasks]))
    return loader.register_all()


def _norm(name: str) -> str:
    """Distribution names compare as pip does (PEP 503): case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


_CACHE: dict[tuple, Registry] = {}


def get_registry(*, plugins_dirs=(), include_tasks=(), strict: bool | None = None) -> Registry:
    key = (tuple(map(str, plugins_dirs)), tuple(map(str, include_tasks)), strict, strict_mode(),
           os.environ.get("HARNESS_PLUGINS"))
    if key not in _CACHE:
        _CACHE[key] = build_registry(plugins_dirs=plugins_dirs, include_tasks=include_tasks, strict=strict)
    return _CACHE[key]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, HarnessError):
        return text[0] if text else "error"
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def loss_problem(out) -> str | None:
    """Why ``out`` breaks the loss contract (a scalar tensor, or ``(scalar tensor, parts dict)``), or None."""
    import torch

    loss = out
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            return f"returned a tuple of {len(out)} item(s); expected (loss, parts dict)"
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        return f"returned {type(loss).__name__} {_short(loss)}, expected a scalar torch.Tensor"
    if loss.numel() != 1:
        return f"returned a tensor of shape {tuple(loss.shape)}, expected a scalar (reduce it, e.g. .mean())"
    if not loss.is_floating_point():
        return f"returned a {loss.dtype} tensor, expected a floating-point loss"
    if torch.is_grad_enabled() and not loss.requires_grad:
        return "returned a tensor that does not require grad (detached from the model's output?)"
    return None


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def guard_method(method, name: str, plugin: str):
    """A copy of ``method`` whose ``loss()`` turns any exception, or a result that is not a scalar loss, into
    one error line naming the method and the plugin that registered it (a third-party bug must not read
    like a harness crash); ``prepare()`` likewise for anything but a ``HarnessError``."""
    guarded = copy.copy(method)
    loss = guarded.loss  # bound to the copy, whose setup() keeps the run's state

    def checked_loss(*a, **kw):
        try:
            out = loss(*a, **kw)
        except Exception as exc:
            raise HarnessError(f"method '{name}' from plugin '{plugin}' failed: {one_line(exc)}") from exc
        problem = loss_problem(out)
        if problem:
            raise HarnessError(f"method '{name}' from plugin '{plugin}': loss() {problem}")
        return out

    object.__setattr__(guarded, "loss", checked_loss)
    prepare = getattr(guarded, "prepare", None)
    if prepare is not None:
        def checked_prepare(*a, **kw):
            try:
                return prepare(*a, **kw)
            except HarnessError:  # the harness's own one-line errors (e.g. a task without questions)
                raise
            except Exception as exc:
                raise HarnessError(f"method '{name}' from plugin '{plugin}' failed in prepare(): "
                                   f"{one_line(exc)}") from exc

        object.__setattr__(guarded, "prepare", checked_prepare)
    return guarded
