"""Which table a run belongs to: the ``report:`` layout its scores.json recorded, or, for results written
before layouts were recorded, that of the built-in task of the same name (docs/tasks.md)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from harness import HarnessError
from harness.tasks import ReportLayout, parse_task, task_files


@dataclass(frozen=True)
class Family:
    """A run's benchmark (the table's key, lower-cased as in the published CSVs) and its layout."""

    benchmark: str
    layout: ReportLayout


def recorded(data: dict, where: str, task: str) -> Family | None:
    """The family a scores.json names (``benchmark`` + ``report``), else the built-in task's, else None
    (a layout without ``split`` also gives None: the task keeps a table of its own)."""
    if isinstance(data.get("report"), dict):
        bench = str(data.get("benchmark") or task)
        layout = ReportLayout.from_dict(data["report"], f"{where}: report", title=bench)
        return Family(bench.lower(), layout) if layout.split is not None else None
    return builtin_families().get(task)


@cache
def builtin_families() -> dict[str, Family]:
    """task name -> family of the built-in tasks that declare a ``report:`` block."""
    from harness.io import read_yaml
    from harness.paths import builtin_root

    doc = read_yaml(builtin_root() / "registry.yaml") or {}
    out = {}
    for d in doc.get("tasks", []):
        for f in task_files(builtin_root() / d):
            try:
                task = parse_task(f)
            except HarnessError:  # `harness validate` reports broken task files; the report carries on
                continue
            if task.report is not None and task.report.split is not None:
                out[task.name] = Family(task.benchmark.lower(), task.report)
    return out


def builtin_published_models() -> dict[str, str]:
    """Our model label -> published model name, over every built-in family."""
    out: dict[str, str] = {}
    for fam in builtin_families().values():
        out.update(fam.layout.published_models)
    return out
