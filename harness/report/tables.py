"""One table per (benchmark, model) in the published layout, and the text of its cells."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.report.load import Cell
from harness.report.published import LOG_METRICS, difference, published_model_names
from harness.results.tables import ARROWS, row_key


@dataclass
class Table:
    benchmark: str
    title: str
    model: str
    splits: list[tuple[str, str]]  # (task, column-group name)
    metrics: list[str]
    rows: list[str]  # display names in published order
    cells: dict[tuple[str, str], Cell]  # (display, task) -> cell
    better: dict[str, str]
    max_seeds: int
    compare_with: list[str] = field(default_factory=list)  # published model names
    published_models: dict[str, str] = field(default_factory=dict)  # our model label -> published name
    plot: dict | None = None  # the family's plot axes ({x, y, log_x, log_y, y_max})
    published_files: tuple[str, ...] = ()


ATTACK = "attack/"  # attack/<name>/<metric>: the attack section's, not a column of the main tables


def build_tables(cells: list[Cell], published: dict | None = None) -> list[Table]:
    """One table per (benchmark, model) for tasks with a report layout (their column groups in the
    family's ``split_order``); a task without one gets a table of its own with every metric it reported."""
    by_key: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        by_key.setdefault((c.family.benchmark if c.family else c.task, c.model), []).append(c)
    tables = []
    for (bench_name, model), group in sorted(by_key.items(), key=lambda kv: _table_order(kv[0], kv[1])):
        family = _family(group)
        if family:
            layout = family.layout
            split_of = {c.task: c.family.layout.split for c in group}
            rank = {s: i for i, s in enumerate(layout.split_order)}
            splits = sorted(split_of.items(), key=lambda ts: (rank.get(ts[1], len(rank)), ts[1], ts[0]))
            metrics = list(layout.columns) or sorted({m for c in group for m in c.stats if not m.startswith(ATTACK)})
            # utility columns (lm-eval "<task>/<metric>" values, e.g. --utility mmlu) join the headline ones
            metrics += sorted({m for c in group for m in c.stats if "/" in m and not m.startswith(ATTACK)} - set(metrics))
        else:  # a task of its own (plugin or --include-tasks): one group, every metric it reported
            splits = [(bench_name, bench_name)]
            metrics = sorted({m for c in group for m in c.stats if not m.startswith(ATTACK)})
        better: dict[str, str] = {}
        for c in group:
            better.update(c.better)
        table = Table(
            benchmark=bench_name,
            title=family.layout.title if family else bench_name,
            model=model,
            splits=splits,
            metrics=metrics,
            rows=sorted({c.display for c in group}, key=row_key),
            cells={(c.display, c.task): c for c in group},
            better=better,
            max_seeds=max(len(c.seeds) for c in group),
            published_models=dict(family.layout.published_models) if family else {},
            plot=family.layout.plot if family else None,
            published_files=family.layout.published if family else (),
        )
        if published is not None and family:
            table.compare_with = published_model_names(model, bench_name, published, table.published_models)
        tables.append(table)
    return tables


def _family(group: list[Cell]):
    """The family-wide layout (title, columns, ...) of a table: that of its first task by name."""
    with_family = sorted((c for c in group if c.family), key=lambda c: c.task)
    return with_family[0].family if with_family else None


def _table_order(key: tuple[str, str], group: list[Cell]):
    family = _family(group)
    return (0, family.layout.order, key) if family else (1, 0, key)


def fmt(value: float | None) -> str:
    """Scientific notation, 3 significant digits (the published tables' format); n/a for missing."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2e}"


def fmt_diff(metric: str, diff: float | None) -> str:
    if diff is None:
        return "n/a"
    return f"{diff:+.2f}" if metric in LOG_METRICS else f"{diff:+.2e}"


def cell_text(table: Table, cell: Cell | None, metric: str) -> str:
    if cell is None:
        return "-"
    stat = cell.stats.get(metric)
    if stat is None:
        return "-"
    text = fmt(stat.mean)
    if stat.std is not None:
        text += f" ± {fmt(stat.std)}"
    if 1 < stat.n < table.max_seeds:  # a single value already shows by its missing ± std
        text += f" (n={stat.n})"
    if cell.partial:
        text += "*"
    return text


def metric_header(table: Table, metric: str) -> str:
    arrow = ARROWS.get(table.better.get(metric, ""), "")
    return f"{metric} {arrow}".strip()


def seed_line(table: Table) -> str:
    seeds = sorted({s for c in table.cells.values() for s in c.seeds})
    if table.max_seeds > 1:
        return f"mean ± sample std over seeds {','.join(map(str, seeds))} (a value without ± comes from one seed)"
    return f"seed {','.join(map(str, seeds))}"


def comparison_rows(table: Table, published: dict, published_model: str) -> list[dict]:
    """One record per (method, split, metric) where we or the paper have a value."""
    rows = []
    methods = list(table.rows)
    for key in published:
        if key[0] == table.benchmark and key[1] == published_model and key[2] not in methods:
            methods.append(key[2])
    methods.sort(key=row_key)
    for display in methods:
        for task, split in table.splits:
            cell = table.cells.get((display, task))
            for metric in table.metrics:
                pub_key = (table.benchmark, published_model, display, split, metric)
                stat = cell.stats.get(metric) if cell else None
                if stat is None and pub_key not in published:
                    continue
                ours = stat.mean if stat else None
                pub = published.get(pub_key)
                rows.append(
                    {
                        "method": display,
                        "split": split,
                        "task": task,
                        "metric": metric,
                        "ours": ours,
                        "ours_text": cell_text(table, cell, metric),
                        "published": pub,
                        "diff": difference(metric, ours, pub),
                        "diff_kind": "log10" if metric in LOG_METRICS else "abs",
                    }
                )
    return rows
