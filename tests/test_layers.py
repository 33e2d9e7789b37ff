"""The house rules of the code: every import of ``harness`` and the built-in ``methods`` points to the same
floor or one below (function-level imports included), no two modules import each other in a cycle, and
no module grows past 500 lines. The floors are the ones docs/architecture.md draws."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# floor -> module prefixes, bottom up (docs/architecture.md)
FLOORS = [
    ("ground", ["harness", "harness.io", "harness.paths", "harness.hub", "harness.options", "harness.fingerprint"]),
    ("registry", ["harness.plugins", "harness.tasks", "harness.task_attack", "harness.task_fields"]),
    ("plugin API", ["harness.methods", "harness.losses", "harness.activations", "harness.metrics", "harness.attacks",
                    "methods"]),
    ("data", ["harness.data"]),
    ("training", ["harness.training", "harness.attacks.relearn"]),
    ("models", ["harness.models"]),
    ("scoring", ["harness.scoring"]),
    ("results", ["harness.results"]),
    ("report", ["harness.report"]),
    ("commands", ["harness.commands", "harness.testing"]),
    ("entry", ["harness.cli", "harness.__main__"]),
]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for base in ("harness", "methods"):
        for f in sorted((ROOT / base).rglob("*.py")):
            if "_builtin" in f.parts:
                continue
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _floor(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            # the bare package name is its __init__ only, not every module below it
            if (module == p or (p != "harness" and module.startswith(p + "."))) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is on no floor: add it to FLOORS and docs/architecture.md"
    return rank


def _target(name: str) -> str | None:
    """The module of ours that an import of ``name`` loads (the longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):  # every level: function-level imports count too
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` is an arrow to pkg.sub; ``from pkg import name`` one to pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            t = _target(n)
            if t is not None and t != module:
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_on_a_floor_and_imports_point_down():
    upward = [f"{m} ({FLOORS[_floor(m)][0]}) imports {t} ({FLOORS[_floor(t)][0]})"
              for m, targets in GRAPH.items() for t in sorted(targets) if _floor(t) > _floor(m)]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_cycle():
    # Tarjan's strongly connected components; any component of more than one module is a cycle
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in GRAPH:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in comps if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n < MAX_LINES, f"{MODULES[module]} has {n} lines: split it by responsibility"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The rules above would pass vacuously if imports inside functions were missed."""
    assert "harness.models.tiny" in GRAPH["harness.models.profiles"]  # imported inside checkpoint_path()
    assert "harness.scoring.reference" in GRAPH["harness.scoring.evaluate"]
    assert _floor("harness.scoring.context") > _floor("harness.models.load")
