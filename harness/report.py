"""`harness report`: result tables in the published layout, comparison with the published numbers, plots.

Reads every `scores.json` under a results folder (layout in docs/architecture.md), averages seeds
(mean and sample standard deviation), and renders one table per (benchmark, model): rows Finetuned,
Retain, then the methods; column groups the splits (forget01/05/10 or News/Books), each with the
benchmark's headline metrics. Values print in scientific notation with 3 significant digits, like the
published tables. `--compare` adds our value, the published one and the gap (log10 for forget quality,
where a published 0 or a missing value gives n/a instead of an infinite gap).
"""

from __future__ import annotations

import csv
import fnmatch
import html
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from harness import HarnessError
from harness.io import write_json, write_text

PUBLISHED_DIR = Path(__file__).parent / "bundled" / "published"


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

# Published row order; other methods follow alphabetically.
ROW_ORDER = ("Finetuned", "Retain", "GradAscent", "GradDiff", "IdkDPO", "NPO", "SimNPO")
DISPLAY_NAMES = {
    "finetuned": "Finetuned",
    "retain": "Retain",
    "grad_ascent": "GradAscent",
    "grad_diff": "GradDiff",
    "idk_dpo": "IdkDPO",
    "npo": "NPO",
    "simnpo": "SimNPO",
    "rmu": "RMU",
}
# Our model profiles -> model names in the published CSVs.
PUBLISHED_MODELS = {
    "llama2-7b-chat": "Llama-2-7b-chat-hf",
    "llama3.2-1b-instruct": "Llama-3.2-1B-Instruct",
    "llama2-7b": "Llama-2-7b-hf",
}
# Gaps on these metrics are reported in log10: p-values span hundreds of orders of magnitude.
LOG_METRICS = frozenset({"forget_quality"})
ARROWS = {"higher": "↑", "lower": "↓", "zero": "→0", "one": "→1"}


# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass
class RunScores:
    """One finished (or partial) run: the content of one scores.json."""

    path: Path
    model: str
    task: str
    method: str
    display: str
    seed: int
    config: str  # the <hash8> part of the run directory name
    partial: bool
    values: dict[str, float | None]
    better: dict[str, str]
    mtime: float
    seconds: dict[str, float] = field(default_factory=dict)  # "train" / "eval" wall time, where recorded


_RUN_DIR = re.compile(r"^(?P<hash>[0-9A-Za-z]+)-s(?P<seed>-?\d+)$")


def _read_scores(path: Path) -> RunScores:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: not readable JSON ({exc}); delete the run folder and rerun it") from exc
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected a JSON object with task/method/model/metrics")
    if not isinstance(data.get("metrics"), dict):
        raise HarnessError(f"{path}: field 'metrics' is missing; is this a scores.json written by harness?")
    # Fields the file lacks come from its place in <model>/<task>/<method>/<hash8>-s<seed>/.
    parts = path.parent.parts
    for key, depth in (("method", 2), ("task", 3), ("model", 4)):
        if not data.get(key):
            if len(parts) < depth:
                raise HarnessError(
                    f"{path}: field '{key}' is missing and the folder is not <model>/<task>/<method>/<run>"
                )
            data[key] = parts[-depth]
    m = _RUN_DIR.match(path.parent.name)
    seed = data.get("seed")
    if seed is None:
        seed = int(m["seed"]) if m else 0
    values: dict[str, float | None] = {}
    better: dict[str, str] = {}
    for name, entry in data["metrics"].items():
        if isinstance(entry, dict):
            value = entry.get("value")
            if entry.get("better"):
                better[name] = entry["better"]
        else:  # a bare number is accepted: hand-made or exported trees
            value = entry
        values[name] = None if value is None or not _finite(value) else float(value)
    method = str(data["method"])
    return RunScores(
        path=path,
        model=str(data["model"]),
        task=str(data["task"]),
        method=method,
        display=str(data.get("method_display") or DISPLAY_NAMES.get(method, method)),
        seed=int(seed),
        config=m["hash"] if m else path.parent.name,
        partial=bool(data.get("partial", False)),
        values=values,
        better=better,
        mtime=path.stat().st_mtime,
        seconds=_seconds(data),
    )


def _seconds(data: dict) -> dict[str, float]:
    found = {"train": data.get("train_seconds"), "eval": (data.get("eval") or {}).get("seconds")}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and _finite(v)}


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def load_runs(results: Path, model: str | None = None) -> list[RunScores]:
    """Every scores.json under `results`; `model` is a comma-separated list of fnmatch patterns."""
    results = Path(results)
    if not results.is_dir():
        raise HarnessError(
            f"results folder {results} does not exist; pass the -o/--output folder of `harness run`"
        )
    runs = [_read_scores(p) for p in sorted(results.rglob("scores.json"))]
    if not runs:
        raise HarnessError(f"no scores.json under {results}; run `harness run ... -o {results}` first")
    if model:
        patterns = [p.strip() for p in model.split(",") if p.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.model, p) for p in patterns)]
        if not runs:
            raise HarnessError(f"--model {model}: no results for that model under {results}")
    return runs


# ---------------------------------------------------------------------------------------------------
# Aggregation over seeds


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation (n - 1); None with fewer than two values
    n: int
    values: list[float | None]


@dataclass
class Cell:
    """One (model, task, method): the seeds of one configuration, aggregated."""

    model: str
    task: str
    method: str
    display: str
    config: str
    seeds: list[int]
    partial: bool
    stats: dict[str, Stat]
    better: dict[str, str]
    other_configs: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # mean over the seeds that recorded it


def aggregate(values: list[float | None]) -> Stat:
    present = [v for v in values if v is not None]
    if not present:
        return Stat(None, None, 0, values)
    mean = statistics.fmean(present)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(mean, std, len(present), values)


def build_cells(runs: list[RunScores]) -> list[Cell]:
    """Group runs by (model, task, method) and average their seeds.

    A cell holding several configurations (e.g. a --limit smoke run beside the full one, or a
    changed hyper-parameter) shows one: complete runs before partial ones, then the most recent;
    the others are named in the report's notes rather than mixed into one mean.
    """
    groups: dict[tuple[str, str, str], dict[str, list[RunScores]]] = {}
    for r in runs:
        groups.setdefault((r.model, r.task, r.method), {}).setdefault(r.config, []).append(r)
    cells = []
    for (model, task, method), by_config in groups.items():
        ranked = sorted(
            by_config.items(),
            key=lambda kv: (all(not r.partial for r in kv[1]), max(r.mtime for r in kv[1]), kv[0]),
            reverse=True,
        )
        config, chosen = ranked[0]
        chosen = sorted(chosen, key=lambda r: r.seed)
        names = sorted({name for r in chosen for name in r.values})
        better: dict[str, str] = {}
        for r in chosen:
            better.update(r.better)
        cells.append(
            Cell(
                model=model,
                task=task,
                method=method,
                display=chosen[0].display,
                config=config,
                seeds=[r.seed for r in chosen],
                partial=any(r.partial for r in chosen),
                stats={name: aggregate([r.values.get(name) for r in chosen]) for name in names},
                better=better,
                other_configs=[c for c, _ in ranked[1:]],
                seconds={k: aggregate([r.seconds.get(k) for r in chosen]).mean for k in ("train", "eval")
                         if any(k in r.seconds for r in chosen)},
            )
        )
    return cells


# ---------------------------------------------------------------------------------------------------
# Published numbers


def load_published(source: Path | None = None) -> dict[tuple[str, str, str, str, str], float | None]:
    """(benchmark, model, method, split, metric) -> value from the published CSVs (a file or a folder)."""
    source = PUBLISHED_DIR if source is None else Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.csv"))
    elif source.is_file():
        files = [source]
    else:
        raise HarnessError(f"--compare {source}: no such file or folder")
    if not files:
        raise HarnessError(f"--compare {source}: no .csv files there")
    wanted = ["benchmark", "model", "method", "split", "metric", "value"]
    table: dict[tuple[str, str, str, str, str], float | None] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in wanted if c not in (reader.fieldnames or [])]
            if missing:
                raise HarnessError(f"{path}: columns {missing} missing; expected header {','.join(wanted)}")
            for row in reader:
                text = (row["value"] or "").strip()
                try:
                    value = float(text) if text and text.lower() not in {"n/a", "nan", "none"} else None
                except ValueError as exc:
                    raise HarnessError(f"{path}: value {text!r} is not a number") from exc
                key = (row["benchmark"], row["model"], row["method"], row["split"], row["metric"])
                table[key] = value
    return table


def published_model_names(model: str, benchmark: str, published: dict) -> list[str]:
    """The published model(s) a results model is compared with.

    The same name matches first; profiles map by name; a hub id or folder containing a published name maps to it (longest match);
    anything else (the embedded `tiny` model) is shown against every published model of the
    benchmark, for orientation only.
    """
    names = sorted({k[1] for k in published if k[0] == benchmark})
    if model in names:  # e.g. a results CSV of ours used as the comparison
        return [model]
    if model in PUBLISHED_MODELS:
        return [PUBLISHED_MODELS[model]] if PUBLISHED_MODELS[model] in names else []
    contained = [n for n in names if n.lower() in model.lower()]
    if contained:
        return [max(contained, key=len)]
    return names


def is_counterpart(model: str, published_model: str) -> bool:
    """True when `published_model` is the same model as ours (not a fallback for orientation)."""
    return (
        model == published_model
        or PUBLISHED_MODELS.get(model) == published_model
        or published_model.lower() in model.lower()
    )


def difference(metric: str, ours: float | None, published: float | None) -> float | None:
    """ours - published; in log10 for forget quality. None (n/a) when a finite gap does not exist."""
    if ours is None or published is None:
        return None
    if metric in LOG_METRICS:
        if ours <= 0 or published <= 0:
            return None
        return math.log10(ours) - math.log10(published)
    return ours - published


# ---------------------------------------------------------------------------------------------------
# Tables


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


def _row_key(display: str) -> tuple[int, str]:
    return (ROW_ORDER.index(display), "") if display in ROW_ORDER else (len(ROW_ORDER), display.lower())


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
            rows=sorted({c.display for c in group}, key=_row_key),
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


def _delta_header(metric: str) -> str:
    return "Δlog10" if metric in LOG_METRICS else "Δ"


def _compare_cells(metric: str, record: dict | None) -> list[str]:
    """ours / published / difference, as the markdown and HTML comparison tables show them."""
    if record is None:
        return ["-", "-", "n/a"]
    return [record["ours_text"], fmt(record["published"]), fmt_diff(metric, record["diff"])]


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


def _metric_header(table: Table, metric: str) -> str:
    arrow = ARROWS.get(table.better.get(metric, ""), "")
    return f"{metric} {arrow}".strip()


def _seed_line(table: Table) -> str:
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
    methods.sort(key=_row_key)
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


# ---------------------------------------------------------------------------------------------------
# Renderers


def _notes(tables: list[Table], compare: bool) -> list[str]:
    notes = []
    if any(c.partial for t in tables for c in t.cells.values()):
        notes.append(
            "`*` partial result (--limit, or an interrupted evaluation): not comparable with the published numbers."
        )
    for t in tables:
        for c in sorted(t.cells.values(), key=lambda c: (c.task, c.method)):
            if c.other_configs:
                notes.append(
                    f"{t.model} {c.task} {c.display}: showing configuration {c.config}; "
                    f"also found {', '.join(c.other_configs)} (not averaged in)."
                )
    if compare:
        notes.append(
            "Δ = ours − published; for forget_quality Δ is log10(ours) − log10(published). "
            "n/a: no finite gap (a published value of 0 or a missing value on either side)."
        )
        notes.append(
            "The published Retain rows print forget_quality 0.00e+00, a misprint for 1.0; other known gaps between "
            "the published tables and the shipped logs are listed in harness/bundled/published/README.md."
        )
        if any(t.model not in PUBLISHED_MODELS and len(t.compare_with) > 1 for t in tables):
            notes.append(
                "Models without a published counterpart (e.g. the embedded `tiny`) are shown against each published "
                "model for orientation: they check the pipeline, not the published numbers."
            )
    return notes


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_header(cells: list[str]) -> list[str]:
    return [_md_row(cells), "|" + "---|" * len(cells)]


def render_markdown(tables: list[Table], published: dict | None) -> str:
    out = ["# Results", ""]
    for t in tables:
        out.append(f"## {t.title} · {t.model}")
        out.append("")
        out.append(f"_{_seed_line(t)}_")
        out.append("")
        header = ["method"] + [f"{split} {_metric_header(t, m)}" for _, split in t.splits for m in t.metrics]
        out += _md_header(header)
        for display in t.rows:
            row = [display] + [
                cell_text(t, t.cells.get((display, task)), m) for task, _ in t.splits for m in t.metrics
            ]
            out.append(_md_row(row))
        out.append("")
        if published is not None:
            if not t.compare_with:
                out.append(f"_No published numbers for {t.title} · {t.model}._")
                out.append("")
            for pub_model in t.compare_with:
                records = comparison_rows(t, published, pub_model)
                out.append(f"### {t.title} · {t.model} vs published {pub_model}")
                out.append("")
                for task, split in t.splits:
                    out.append(f"**{split}**")
                    out.append("")
                    header = ["method"]
                    for m in t.metrics:
                        header += [f"{m} ours", "published", _delta_header(m)]
                    out += _md_header(header)
                    by = {(r["method"], r["metric"]): r for r in records if r["task"] == task}
                    for display in dict.fromkeys(r["method"] for r in records):
                        row = [display]
                        for m in t.metrics:
                            row += _compare_cells(m, by.get((display, m)))
                        out.append(_md_row(row))
                    out.append("")
    notes = _notes(tables, published is not None)
    if notes:
        out.append("Notes:")
        out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


def render_html(tables: list[Table], published: dict | None) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>unlearn-harness results</title>',
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;white-space:nowrap}"
        "th:first-child,td:first-child{text-align:left}th{background:#eee}</style>",
        "</head><body><h1>Results</h1>",
    ]
    for t in tables:
        out.append(f"<h2>{e(t.title)} · {e(t.model)}</h2><p><em>{e(_seed_line(t))}</em></p><table>")
        out.append('<tr><th rowspan="2">method</th>')
        out.extend(f'<th colspan="{len(t.metrics)}">{e(split)}</th>' for _, split in t.splits)
        out.append("</tr><tr>")
        out.extend(f"<th>{e(_metric_header(t, m))}</th>" for _ in t.splits for m in t.metrics)
        out.append("</tr>")
        for display in t.rows:
            tds = "".join(
                f"<td>{e(cell_text(t, t.cells.get((display, task)), m))}</td>"
                for task, _ in t.splits
                for m in t.metrics
            )
            out.append(f"<tr><td>{e(display)}</td>{tds}</tr>")
        out.append("</table>")
        if published is None:
            continue
        if not t.compare_with:
            out.append(f"<p><em>No published numbers for {e(t.title)} · {e(t.model)}.</em></p>")
        for pub_model in t.compare_with:
            records = comparison_rows(t, published, pub_model)
            out.append(f"<h3>{e(t.title)} · {e(t.model)} vs published {e(pub_model)}</h3><table>")
            out.append('<tr><th rowspan="2">method</th>')
            for _, split in t.splits:
                out.append(f'<th colspan="{3 * len(t.metrics)}">{e(split)}</th>')
            out.append("</tr><tr>")
            for _ in t.splits:
                for m in t.metrics:
                    out.append(f"<th>{e(m)} ours</th><th>published</th><th>{_delta_header(m)}</th>")
            out.append("</tr>")
            by = {(r["method"], r["task"], r["metric"]): r for r in records}
            for display in dict.fromkeys(r["method"] for r in records):
                tds = "".join(
                    f"<td>{e(cell)}</td>"
                    for task, _ in t.splits
                    for m in t.metrics
                    for cell in _compare_cells(m, by.get((display, task, m)))
                )
                out.append(f"<tr><td>{e(display)}</td>{tds}</tr>")
            out.append("</table>")
    notes = _notes(tables, published is not None)
    if notes:
        out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_timing(tables: list[Table]) -> str:
    """Wall time per run (Markdown): what a cell of the grid costs on this hardware."""
    out = []
    for t in tables:
        out += [f"## Wall time (s) · {t.title} · {t.model}", "",
                "_training + scoring = total, mean over seeds; baseline rows are only scored_", ""]
        header = ["method"] + [split for _, split in t.splits]
        out += _md_header(header)
        for display in t.rows:
            row = [display] + [_time_text(t.cells.get((display, task))) for task, _ in t.splits]
            out.append(_md_row(row))
        out.append("")
    return "\n".join(out)


def _time_text(cell: Cell | None) -> str:
    sec = cell.seconds if cell else {}
    if "train" in sec and "eval" in sec:
        return f"{sec['train']:.0f} + {sec['eval']:.0f} = {sec['train'] + sec['eval']:.0f}"
    if sec:  # one part recorded: say which
        return " ".join(f"{v:.0f} ({'training' if k == 'train' else 'scoring'})" for k, v in sec.items())
    return "-"


CSV_COLUMNS = ["benchmark", "model", "method", "split", "metric", "value", "std", "n", "seeds", "partial"]
COMPARE_COLUMNS = ["published_model", "published", "diff", "diff_kind"]


def render_csv(tables: list[Table], published: dict | None) -> str:
    """Long format, the published CSVs' columns first (so a results CSV can itself be a --compare source)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (COMPARE_COLUMNS if published is not None else []))
    for t in tables:
        compare_rows = {}
        for pub_model in t.compare_with if published is not None else []:
            for r in comparison_rows(t, published, pub_model):
                compare_rows.setdefault((r["method"], r["task"], r["metric"]), []).append((pub_model, r))
        for display in t.rows:
            for task, split in t.splits:
                cell = t.cells.get((display, task))
                if cell is None:
                    continue
                for m in t.metrics:
                    stat = cell.stats.get(m)
                    if stat is None:
                        continue
                    base = [
                        t.benchmark,
                        t.model,
                        display,
                        split,
                        m,
                        fmt(stat.mean),
                        fmt(stat.std) if stat.std is not None else "",
                        stat.n,
                        " ".join(map(str, cell.seeds)),
                        str(cell.partial).lower(),
                    ]
                    if published is None:
                        writer.writerow(base)
                        continue
                    matches = compare_rows.get((display, task, m)) or [("", None)]
                    for pub_model, r in matches:
                        if r is None:
                            writer.writerow(base + ["", "", "", ""])
                        else:
                            writer.writerow(
                                base
                                + [pub_model, fmt(r["published"]), fmt_diff(m, r["diff"]), r["diff_kind"]]
                            )
    return buf.getvalue()


def to_json(tables: list[Table], published: dict | None) -> dict:
    """Full precision: every metric a run reported, not only the table's headline ones."""
    out = {"tables": [], "notes": _notes(tables, published is not None)}
    for t in tables:
        entry = {
            "benchmark": t.benchmark,
            "model": t.model,
            "splits": [s for _, s in t.splits],
            "metrics": t.metrics,
            "better": t.better,
            "rows": [],
            "comparison": {},
        }
        for display in t.rows:
            for task, split in t.splits:
                cell = t.cells.get((display, task))
                if cell is None:
                    continue
                entry["rows"].append(
                    {
                        "method": display,
                        "method_name": cell.method,
                        "split": split,
                        "task": task,
                        "config": cell.config,
                        "seeds": cell.seeds,
                        "partial": cell.partial,
                        "metrics": {
                            name: {"mean": s.mean, "std": s.std, "n": s.n, "values": s.values}
                            for name, s in cell.stats.items()
                        },
                    }
                )
        if published is not None:
            for pub_model in t.compare_with:
                entry["comparison"][pub_model] = [
                    {k: v for k, v in r.items() if k != "ours_text"}
                    for r in comparison_rows(t, published, pub_model)
                ]
        out["tables"].append(entry)
    return out


# ---------------------------------------------------------------------------------------------------
# Plot


def plot(tables: list[Table], path: Path, published: dict | None = None) -> Path:
    """Forget quality (log) against model utility per method and split (TOFU), and MUSE's forgetting
    (verbatim-memorisation ROUGE) against retained knowledge; hollow markers are the published points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    axes_spec = {
        "tofu": ("model_utility", "forget_quality", True),
        "muse": ("retain_knowmem_ROUGE", "forget_verbmem_ROUGE", False),
    }
    panels = [t for t in tables if t.benchmark in axes_spec]
    if not panels:
        raise HarnessError(f"--plot {path}: no TOFU or MUSE results to plot")
    methods = sorted({d for t in panels for d in t.rows}, key=_row_key)
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(methods)}
    markers = ["o", "s", "^", "D", "v", "P"]

    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.8 * ncols + 1.6, 5.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, panels):
        xm, ym, logy = axes_spec[t.benchmark]
        split_marker = {task: markers[i % len(markers)] for i, (task, _) in enumerate(t.splits)}
        off_scale = []
        for display in t.rows:
            for task, split in t.splits:
                cell = t.cells.get((display, task))
                if cell is None:
                    continue
                x, y = cell.stats.get(xm), cell.stats.get(ym)
                if x is None or y is None or x.mean is None or y.mean is None:
                    continue
                if logy and y.mean <= 0:
                    off_scale.append(f"{display}/{split}")
                    continue
                yerr = None
                if y.std is not None:
                    # A log axis cannot show a bar reaching 0 or below; clip the lower arm.
                    lower = min(y.std, y.mean * 0.999) if logy else y.std
                    yerr = [[lower], [y.std]]
                ax.errorbar(
                    x.mean,
                    y.mean,
                    xerr=x.std,
                    yerr=yerr,
                    fmt=split_marker[task],
                    color=colours[display],
                    markersize=8,
                    markeredgecolor="black" if not cell.partial else colours[display],
                    capsize=3,
                    alpha=0.6 if cell.partial else 1.0,
                )
        # Published points only beside their own model: the tiny model has no counterpart to overlay.
        pub_model = (
            next((p for p in t.compare_with if is_counterpart(t.model, p)), None) if published else None
        )
        if pub_model:
            for display in t.rows:
                for task, split in t.splits:
                    px = published.get((t.benchmark, pub_model, display, split, xm))
                    py = published.get((t.benchmark, pub_model, display, split, ym))
                    if px is None or py is None or (logy and py <= 0):
                        continue
                    ax.plot(
                        px,
                        py,
                        split_marker[task],
                        markerfacecolor="none",
                        markeredgecolor=colours[display],
                        markersize=10,
                        markeredgewidth=1.5,
                    )
        if logy:
            ax.set_yscale("log")
            # Forget quality is a p-value: nothing lies above 1, only error bars would stretch the axis.
            ax.set_ylim(top=10.0)
        ax.set_xlabel(f"{xm} (higher is better)")
        ax.set_ylabel(f"{ym} ({'log scale, ' if logy else ''}{'higher' if logy else 'lower'} is better)")
        title = f"{t.title} · {t.model}"
        if pub_model:
            title += f"\nfilled: ours · hollow: published {pub_model}"
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        if off_scale:
            ax.text(
                0.01,
                0.01,
                f"{ym} = 0, not drawn: {', '.join(off_scale)}",
                transform=ax.transAxes,
                fontsize=7,
                va="bottom",
            )
        split_handles = [
            Line2D(
                [],
                [],
                linestyle="none",
                marker=split_marker[task],
                color="grey",
                markeredgecolor="black",
                label=split,
            )
            for task, split in t.splits
        ]
        ax.add_artist(ax.legend(handles=split_handles, title="split", loc="best", fontsize=8))
    method_handles = [
        Line2D([], [], linestyle="none", marker="o", color=colours[d], label=d) for d in methods
    ]
    fig.legend(handles=method_handles, title="method", loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (6.8 * ncols + 1.6), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Render to memory first so an interrupted run never leaves a truncated PNG.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    from harness.io import write_bytes

    write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------
# Entry point


def _compare_source(compare) -> Path | None | bool:
    """args.compare: None/False = off; True or "" = the shipped CSVs; a path = those CSVs."""
    if compare is None or compare is False:
        return False
    if compare is True or str(compare).strip() in {"", "published", "default"}:
        return None
    return Path(compare)


def main(args) -> int:
    fmt_name = getattr(args, "format", None) or "md"
    if fmt_name not in {"md", "csv", "html", "json"}:
        raise HarnessError(f"--format {fmt_name}: choose md, csv, html or json")
    runs = load_runs(Path(args.results), getattr(args, "model", None))
    source = _compare_source(getattr(args, "compare", None))
    published = None if source is False else load_published(source)
    tables = build_tables(build_cells(runs), published)
    if fmt_name == "json":
        text = json.dumps(to_json(tables, published), indent=2, ensure_ascii=False) + "\n"
    else:
        text = {"md": render_markdown, "csv": render_csv, "html": render_html}[fmt_name](tables, published)
    output = getattr(args, "output", None)
    if output:
        if fmt_name == "json":
            write_json(Path(output), to_json(tables, published))
        else:
            write_text(Path(output), text)
        print(f"report written to {output}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    if getattr(args, "timing", False):
        print(render_timing(tables))
    plot_path = getattr(args, "plot", None)
    if plot_path:
        plot(tables, Path(plot_path), published)
        print(f"plot written to {plot_path}")
    return 0
