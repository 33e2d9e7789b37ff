"""``harness ls`` and ``harness validate``."""

from __future__ import annotations

import dataclasses
import fnmatch

from harness import HarnessError
from harness.methods import build_method, literal_choices, reference_of
from harness.models.profiles import get_profiles
from harness.options import LIST_KINDS, ListOptions
from harness.plugins import build_registry, get_registry
from harness.results.tables import Sheet, to_plain


def _rows(title: str, rows: list[tuple], header: tuple) -> str:
    if not rows:
        return f"{title}: (none)\n"
    return f"{title}:\n" + to_plain(Sheet(list(header), [list(r) for r in rows]), indent="  ") + "\n"


def _reference(cls) -> str:
    """What the default configuration needs of the frozen start model (none, logprobs or model)."""
    try:
        return reference_of(cls())
    except Exception as exc:  # a broken plugin must not hide the rest of the listing
        return f"? ({type(exc).__name__})"


def _hyper(cls, f) -> str:
    choices = literal_choices(cls, f.name)
    default = "(required)" if f.metadata.get("required") else f.default
    return f"{f.name}={default}" + (f" ({'|'.join(map(str, choices))})" if choices else "")


def render(what: str, pattern: str, reg) -> str:
    m = lambda name, *extra: fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(e, pattern) for e in extra)  # noqa: E731
    out = []
    if what in ("all", "tasks"):
        rows = [(t.name, ",".join(t.tag), t.version, reg.sources[("tasks", t.name)], t.description)
                for t in sorted(reg.tasks.values(), key=lambda t: t.name) if m(t.name, *t.tag)]
        out.append(_rows("tasks", rows, ("name", "tags", "version", "from", "description")))
    if what in ("all", "methods"):
        rows = []
        for name, cls in sorted(reg.methods.items()):
            if not m(name):
                continue
            hp = ", ".join(_hyper(cls, f) for f in dataclasses.fields(cls))
            src = reg.sources[("methods", name)]
            info = next((p for p in reg.plugins if p.name == src), None)
            dist = f"{info.dist} {info.version}" if info and info.dist and info.version else (info.dist if info and info.dist else src)
            rows.append((name, cls.display_name or name, _reference(cls), "yes" if cls.uses_idk else "no", dist, hp))
        out.append(_rows("methods", rows, ("name", "display", "reference", "idk", "from", "hyper-parameters")))
    if what in ("all", "metrics"):
        rows = [(n, mt.better, "yes" if mt.needs_reference else "no", mt.version, mt.description)
                for n, mt in sorted(reg.metrics.items()) if m(n)]
        out.append(_rows("metrics", rows, ("name", "better", "reference", "version", "description")))
    if what in ("all", "attacks"):
        rows = [(n, cls.version, reg.sources[("attacks", n)], ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls)),
                 cls.description) for n, cls in sorted(reg.attacks.items()) if m(n)]
        out.append(_rows("attacks", rows, ("name", "version", "from", "settings", "description")))
    if what in ("all", "models"):
        rows = [(p.name, p.dtype, p.tokenizer or "(own)", ",".join(sorted(p.tasks)), p.description)
                for p in get_profiles().values() if m(p.name)]
        out.append(_rows("models", rows, ("name", "dtype", "tokenizer", "tasks", "description")))
    if what in ("all", "plugins"):
        rows = [(p.name, p.source, f"{p.dist or '-'} {p.version or ''}".strip(), p.status,
                 p.error or f"{len(p.provides)} registered") for p in reg.plugins if m(p.name)]
        out.append(_rows("plugins", rows, ("name", "source", "distribution", "status", "detail")))
    return "\n".join(out)


def main(opts: ListOptions) -> int:
    if opts.what not in LIST_KINDS:
        raise HarnessError(f"harness ls {opts.what}: choose one of {', '.join(LIST_KINDS)}")
    if opts.verb == "ls":
        reg = get_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks)
        print(render(opts.what, opts.pattern, reg), end="")
        return 0
    # validate: strict loading, every task's metrics known, profile entries point at known tasks
    reg = build_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks, strict=True)
    from harness.tasks import select, suggest

    problems = []
    names = select(opts.tasks, reg.tasks, kind="task", tags_of=lambda t: t.tag)
    for name in names:
        t = reg.tasks[name]
        for metric, _ in t.metrics:
            if metric not in reg.metrics:
                problems.append(f"{t.file}: metric '{metric}' is not registered{suggest(metric, reg.metrics)}")
        for metric in (*t.attack.metrics, *t.attack.utility) if t.attack else ():
            if metric not in reg.metrics:
                problems.append(f"{t.file}: attack metric '{metric}' is not registered{suggest(metric, reg.metrics)}")
        for mname in t.methods:
            if mname not in reg.methods:
                problems.append(f"{t.file}: methods.{mname}: no such method{suggest(mname, reg.methods)}")
                continue
            try:
                build_method(reg.methods[mname], t.method_defaults(mname)[0])
            except HarnessError as exc:
                problems.append(f"{t.file}: methods.{mname}: {exc}")
    for prof in get_profiles().values():
        for tname in prof.tasks:
            if tname not in reg.tasks:
                problems.append(f"registry.yaml: models.{prof.name}.tasks: unknown task '{tname}'{suggest(tname, reg.tasks)}")
    for p in problems:
        print(f"problem: {p}")
    if problems:
        raise HarnessError(f"{len(problems)} problem(s) found")
    print(f"ok: {len(names)} task(s), {len(reg.methods)} method(s), {len(reg.metrics)} metric(s), "
          f"{len(reg.plugins)} plugin(s), {len(get_profiles())} model profile(s)")
    return 0
