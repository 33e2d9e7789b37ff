"""The data a run reads, decided once: each role's split with the task's tiny fallback applied, and
where it comes from (hub, bundled copy, --data-dir file).

A task may name, per data role, a ``tiny_fallback`` split (task YAML ``data.<role>.tiny_fallback``):
with the embedded ``tiny`` models, and only then, a role whose declared split is not available reads
the fallback instead and says so. MUSE-News uses it for raw/retain1, which is too large to ship: the
tiny models were built from the bundled privleak retain texts, so a run on them stays meaningful.
For the published models a missing split is an error that names it and how to supply it.

``harness run`` resolves all of it in ``expand()`` (``resolve_task_data``), before the run hash, so
an online and an offline run of one cell never share a run directory while reading different data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness import HarnessError
from harness.tasks import DataSpec, ResolvedSpec, Task


def is_tiny_model(path: str | Path | None) -> bool:
    """Whether ``path`` is an embedded tiny checkpoint (``tiny:<kind>`` or a directory in the tiny cache)."""
    if not path:
        return False
    s = str(path)
    if s.startswith("tiny:"):
        return True
    from harness.paths import harness_home

    try:
        Path(s).resolve().relative_to((harness_home() / "tiny").resolve())
    except (ValueError, OSError):
        return False
    return True


def fallback_spec(task: Task, role: str, data_dir=None, *, tiny: bool) -> DataSpec | None:
    """The split that replaces ``role`` in a run, or None when the declared split is used."""
    from harness.data.splits import missing_splits, resolve_source

    fb = task.fallbacks.get(role)
    if not tiny or fb is None or role not in task.data:
        return None
    if not missing_splits({role: task.data[role]}, data_dir):
        return None
    if resolve_source(fb, data_dir) is None:
        return None
    return fb


def run_data_specs(task: Task, data_dir=None, *, tiny: bool) -> dict[str, DataSpec]:
    """The task's data roles with the tiny fallback applied (what a run will actually read)."""
    return {role: fallback_spec(task, role, data_dir, tiny=tiny) or spec for role, spec in task.data.items()}


def resolve_task_data(task: Task, data_dir=None, *, tiny: bool) -> tuple[Task, dict]:
    """The task with every data role pinned to its source, and the record of that decision for the run's
    config (role -> {path, name, split, source[, instead_of]}; source None: not available)."""
    from harness.data.splits import resolved

    data, record = {}, {}
    for role, spec in task.data.items():
        fb = fallback_spec(task, role, data_dir, tiny=tiny)
        use = resolved(fb or spec, data_dir)
        data[role] = use
        record[role] = {**use.to_dict(), "source": use.source if isinstance(use, ResolvedSpec) else None}
        if fb is not None:
            record[role]["instead_of"] = spec.label()
    return dataclasses.replace(task, data=data, fallbacks={}), record


def announce_fallbacks(task: Task, record: dict) -> None:
    from harness.hub import notice_once

    for role, r in record.items():
        if "instead_of" in r:
            notice_once(f"tiny-fallback:{task.name}:{role}",
                        f"task '{task.name}': {r['instead_of']} is not available; the embedded tiny model uses the "
                        f"{DataSpec(r['path'], r['name'], r['split']).label()} texts as its {role} corpus (data role "
                        f"'{role}'; those it was built from). For the published setup supply {r['instead_of']} with "
                        "--data-dir DIR or the hub.")


def corpus_rows(task: Task, role: str, data_dir=None, *, tiny: bool) -> list[dict]:
    """Rows of data role ``role`` for unlearning, with the tiny fallback (a pinned spec is read as is)."""
    from harness.data.splits import load_split

    fb = fallback_spec(task, role, data_dir, tiny=tiny)
    if fb is not None:
        announce_fallbacks(task, {role: {**fb.to_dict(), "instead_of": task.data_spec(role).label()}})
        return load_split(fb, data_dir)
    return load_split(task.data_spec(role), data_dir)


def missing_data_error(task: Task, data_dir=None, *, tiny: bool = False) -> HarnessError | None:
    """The fail-fast error for splits that cannot be found (None when everything is there)."""
    from harness.data.splits import missing_splits

    specs = run_data_specs(task, data_dir, tiny=tiny)
    missing = missing_splits(specs, data_dir)
    if not missing:
        return None
    hinted = [r for r in specs if r in task.obtain and missing_splits({r: specs[r]}, data_dir)]
    if hinted:  # a corpus the hub does not serve (WMDP): say where to get it and how to pass it
        role = hinted[0]
        spec = specs[role]
        where = f"not in --data-dir {data_dir}" if data_dir else "not given (no --data-dir)"
        others = f" (also missing: {', '.join(hinted[1:])})" if len(hinted) > 1 else ""
        return HarnessError(
            f"task '{task.name}': the {role} corpus {spec.name}.jsonl is {where}{others}; get it: "
            f"{task.obtain[role]}; then pass --data-dir DIR, DIR holding {spec.name}.jsonl")
    where = f" (looked in --data-dir {data_dir} and the bundled data)" if data_dir else " (not bundled)"
    return HarnessError(
        f"task '{task.name}': data not available offline: {', '.join(missing)}{where}; supply them with "
        "--data-dir DIR holding <subset>/<split>.jsonl (the config name and split of each, e.g. "
        "raw/forget.jsonl, or forget01.jsonl for a split 'train') or run with hub access")


def text_key(task: Task, rows: list[dict], role: str) -> str:
    key = task.field_name("text")
    if rows and key not in rows[0]:
        raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' has no field '{key}' "
                           f"(fields: {', '.join(rows[0])}); fix prompt.text")
    return key
