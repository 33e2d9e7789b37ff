"""One table per (benchmark, model) in the published layout, and the text of its cells."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.report.load import Cell
from harness.report.published import LOG_METRICS, difference, published_model_names
from harness.results.tables import ARROWS, row_key


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    splits: dict[str, str]  # task name -> published split (column group) name
    metrics: tuple[str, ...]


BENCHMARKS = {
    "tofu": Benchmark(
        "tofu",
        "TOFU",
        {"tofu_forget01": "forget01", "tofu_forget05": "forget05", "tofu_forget10": "forget10"},
        ("forget_quality", "model_utility", "forget_truth_ratio"),
    ),
    "muse": Benchmark(
        "muse",
        "MUSE",
        {"muse_news": "News", "muse_books": "Books"},
        ("forget_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak", "retain_knowmem_ROUGE"),
    ),
}
TASK_BENCHMARK = {task: b for b in BENCHMARKS.values() for task in b.splits}


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


def build_tables(cells: list[Cell], published: dict | None = None) -> list[Table]:
    by_key: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        bench = TASK_BENCHMARK.get(c.task)
        by_key.setdefault((bench.name if bench else c.task, c.model), []).append(c)
    tables = []
    order = list(BENCHMARKS)
    for (bench_name, model), group in sorted(
        by_key.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0])
    ):
        bench = BENCHMARKS.get(bench_name)
        tasks = {c.task for c in group}
        if bench:
            splits = [(t, s) for t, s in bench.splits.items() if t in tasks]
            metrics = list(bench.metrics)
        else:  # a task of its own (plugin or --include-tasks): one group, every metric it reported
            splits = [(bench_name, bench_name)]
            metrics = sorted({m for c in group for m in c.stats})
        better: dict[str, str] = {}
        for c in group:
            better.update(c.better)
        table = Table(
            benchmark=bench_name,
            title=bench.title if bench else bench_name,
            model=model,
            splits=splits,
            metrics=metrics,
            rows=sorted({c.display for c in group}, key=row_key),
            cells={(c.display, c.task): c for c in group},
            better=better,
            max_seeds=max(len(c.seeds) for c in group),
        )
        if published is not None and bench:
            table.compare_with = published_model_names(model, bench_name, published)
        tables.append(table)
    return tables


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
