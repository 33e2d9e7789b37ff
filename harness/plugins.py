"""Plugin loading and the registry of methods, metrics and tasks.

Load order: built-ins listed in registry.yaml, then installed entry points (group
``unlearn_harness``), then loose files from ``--plugins-dir``. Built-ins go through the same
hooks as third-party plugins. A plugin that fails to import or register is skipped with a
one-line warning naming it (``HARNESS_STRICT_PLUGINS=1`` raises instead). A name registered
twice is an error naming both sources.
"""

from __future__ import annotations

import copy
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
from harness.paths import builtin_root

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
    sources: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{p.name}: {p.error}" for p in self.plugins if p.status == "failed"]

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


class _Loader:
    def __init__(self, strict: bool):
        self.strict = strict
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.reg = Registry()
        self.pending: list[tuple[Any, PluginInfo]] = []

    def fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.status, info.error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
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

    def register_all(self) -> Registry:
        from harness.tasks import parse_task, task_files

        for obj, info in self.pending:
            for hook, kind in (("register_methods", "methods"), ("register_metrics", "metrics"),
                               ("register_tasks", "tasks")):
                impl = getattr(obj, hook, None)
                if impl is None or not hasattr(impl, f"{PROJECT}_impl"):
                    continue
                staged: list[tuple[str, Any]] = []

                def register(item, _kind=kind, _staged=staged):
                    if _kind == "tasks":
                        for f in task_files(Path(item)):
                            t = parse_task(f)
                            _staged.append((t.name, t))
                    else:
                        _staged.append((getattr(item, "name", None), item))

                try:
                    impl(register=register)
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


def guard_method(method, name: str, plugin: str):
    """A copy of ``method`` whose ``loss()`` turns any exception into one error line naming the method and
    the plugin that registered it (a third-party bug must not read like a harness crash)."""
    guarded = copy.copy(method)
    loss = method.loss

    def checked_loss(*a, **kw):
        try:
            return loss(*a, **kw)
        except Exception as exc:
            raise HarnessError(f"method '{name}' from plugin '{plugin}' failed: {one_line(exc)}") from exc

    object.__setattr__(guarded, "loss", checked_loss)
    return guarded
