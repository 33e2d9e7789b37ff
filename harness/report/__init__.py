"""`harness report`: result tables in the published layout, comparison with the published numbers, plots.

Reads every `scores.json` under a results folder (layout in docs/architecture.md), averages seeds
(mean and sample standard deviation), and renders one table per (benchmark, model): rows Finetuned,
Retain, then the methods; column groups the splits (forget01/05/10 or News/Books), each with the
benchmark's headline metrics. Values print in scientific notation with 3 significant digits, like the
published tables. `--compare` adds our value, the published one and the gap (log10 for forget quality,
where a published 0 or a missing value gives n/a instead of an infinite gap).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import HarnessError
from harness.io import write_json, write_text
from harness.options import ReportOptions
from harness.report.attacks import attack_rows, attacks_json, plot_attacks, render_attacks
from harness.report.frontier import pareto, plot_fronts
from harness.report.layout import Family, builtin_families
from harness.report.load import Cell, RunScores, Stat, aggregate, build_cells, config_cells, load_runs
from harness.report.plot import plot
from harness.report.published import (
    LOG_METRICS,
    PUBLISHED_DIR,
    difference,
    is_counterpart,
    load_published,
    published_model_names,
)
from harness.report.render import (
    COMPARE_COLUMNS,
    CSV_COLUMNS,
    render_csv,
    render_html,
    render_markdown,
    render_timing,
    to_json,
)
from harness.report.sweep import choice_sheet, is_sweep, markdown_sheet, preferred, select
from harness.report.tables import (
    Table,
    build_tables,
    cell_text,
    comparison_rows,
    fmt,
    fmt_diff,
)
from harness.results.tables import ARROWS, DISPLAY_NAMES, ROW_ORDER, to_csv, to_html, to_markdown, to_records

__all__ = [
    "ARROWS", "COMPARE_COLUMNS", "CSV_COLUMNS", "DISPLAY_NAMES", "LOG_METRICS",
    "PUBLISHED_DIR", "ROW_ORDER", "Cell", "Family", "RunScores",
    "Stat", "Table", "aggregate", "build_cells", "build_tables", "builtin_families",
    "cell_text", "comparison_rows",
    "config_cells", "difference", "fmt", "fmt_diff", "is_counterpart", "load_published", "load_runs", "main",
    "pareto", "plot", "plot_fronts", "select",
    "published_model_names", "render_csv", "render_html", "render_markdown", "render_timing", "to_json",
]  # fmt: skip


def _compare_source(compare) -> Path | None | bool:
    """args.compare: None/False = off; True or "" = the shipped CSVs; a path = those CSVs."""
    if compare is None or compare is False:
        return False
    if compare is True or str(compare).strip() in {"", "published", "default"}:
        return None
    return Path(compare)


def main(opts: ReportOptions) -> int:
    args = opts
    fmt_name = args.format
    if fmt_name not in {"md", "csv", "html", "json"}:
        raise HarnessError(f"--format {fmt_name}: choose md, csv, html or json")
    runs = load_runs(Path(args.results), args.model)
    source = _compare_source(args.compare)
    points = config_cells(runs)
    choices = select(points, args.utility_fraction, args.best)
    sweep = is_sweep(choices)
    if args.best and not any(args.best in c.stats for c in points):
        raise HarnessError(f"--best {args.best}: no run reports that metric")
    # a swept method's row in the published-layout tables is its selected point
    cells = build_cells(runs, preferred(choices, args.utility_fraction) if sweep else None)
    published = None
    if source is not False:
        # the shipped tables: only those the families in this tree name (report.published)
        names = None if source else [n for c in cells if c.family for n in c.family.layout.published]
        published = load_published(source, names)
    tables = build_tables(cells, published)
    doc = to_json(tables, published)
    if sweep:
        doc["sweep"] = to_records(choice_sheet(choices, args.utility_fraction))
    if fmt_name == "json":
        doc["attacks"] = attacks_json(cells)
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        text = {"md": render_markdown, "csv": render_csv, "html": render_html}[fmt_name](tables, published)
        if sweep and fmt_name in ("md", "html"):
            text = text.rstrip("\n") + "\n\n" + _sweep_section(choices, args.utility_fraction, fmt_name)
        if fmt_name == "md" and render_attacks(cells):
            text = text.rstrip("\n") + "\n\n" + render_attacks(cells)
    output = args.output
    if output:
        if fmt_name == "json":
            write_json(Path(output), doc)
        else:
            write_text(Path(output), text)
        print(f"report written to {output}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    if args.timing:
        print(render_timing(tables))
    if args.export:
        _export(Path(args.export), choices, args.utility_fraction)
        print(f"best sweep points written to {args.export}")
    plot_path = args.plot
    if plot_path:
        if sweep:  # the trade-off view: every point, each method's front and its selected point
            plot_fronts(choices, points, Path(plot_path), args.utility_fraction)
            print(f"plot written to {plot_path}")
        else:
            from harness.report.plot import with_axes

            with_axes(tables, args.plot_x, args.plot_y)
            attacked = attack_rows(cells)
            try:
                plot(tables, Path(plot_path), published)
                print(f"plot written to {plot_path}")
            except HarnessError:
                if not attacked:
                    raise
            if attacked:
                p = Path(plot_path)
                done = plot_attacks(cells, p.with_name(f"{p.stem}_attacks{p.suffix or '.png'}"))
                print(f"attack plot (before vs after) written to {done}")
    if args.curves is not None:
        from harness.report.curves import plot_curves

        target = Path(args.curves) if args.curves else Path(args.results) / "curves.png"
        print(f"training curves written to {plot_curves(runs, target)}")
    return 0


def _sweep_section(choices, fraction: float, fmt_name: str) -> str:
    sheet = markdown_sheet(choices, fraction)
    rules = sorted({ch.rule(fraction) for ch in choices})
    if fmt_name == "html":
        return f"<h2>Sweep: best point per task and method</h2>\n<p>{'; '.join(rules)}</p>\n{to_html(sheet)}\n"
    return ("## Sweep: best point per task and method\n\n" + to_markdown(sheet) + "\n\n"
            + f"Rule: {'; '.join(rules)} (--best METRIC, --utility-fraction F). The tables above show these "
            "points; every point: --export FILE.csv|json, --plot FILE.png.\n")


def _export(path: Path, choices, fraction: float) -> None:
    if path.suffix == ".json":
        write_json(path, to_records(choice_sheet(choices, fraction)))
    else:
        write_text(path, to_csv(choice_sheet(choices, fraction, flat=True)).rstrip("\n") + "\n")
