"""The report as Markdown, HTML, CSV or JSON, and the wall-time table; every table prints through
harness.results.tables."""

from __future__ import annotations

import html

from harness.report.load import Cell
from harness.report.published import LOG_METRICS
from harness.report.tables import Table, cell_text, comparison_rows, fmt, fmt_diff, metric_header, seed_line
from harness.results.tables import Sheet, to_csv, to_html, to_markdown, to_records

CSV_COLUMNS = ["benchmark", "model", "method", "split", "metric", "value", "std", "n", "seeds", "partial"]
COMPARE_COLUMNS = ["published_model", "published", "diff", "diff_kind"]
JSON_ROW_FIELDS = ["method", "method_name", "split", "task", "config", "seeds", "partial", "metrics"]


def results_sheet(t: Table) -> Sheet:
    """Rows the methods, one column group per split holding the headline metrics."""
    header = ["method"] + [metric_header(t, m) for _ in t.splits for m in t.metrics]
    rows = [
        [display] + [cell_text(t, t.cells.get((display, task)), m) for task, _ in t.splits for m in t.metrics]
        for display in t.rows
    ]
    return Sheet(header, rows, [(split, len(t.metrics)) for _, split in t.splits])


def comparison_sheet(t: Table, records: list[dict]) -> Sheet:
    """Ours / published / gap for each metric, one column group per split."""
    header = ["method"] + [
        h for _ in t.splits for m in t.metrics for h in (f"{m} ours", "published", _delta_header(m))
    ]
    by = {(r["method"], r["task"], r["metric"]): r for r in records}
    sheet = Sheet(header, groups=[(split, 3 * len(t.metrics)) for _, split in t.splits])
    for display in dict.fromkeys(r["method"] for r in records):
        row = [display]
        for task, _ in t.splits:
            for m in t.metrics:
                row += _compare_cells(m, by.get((display, task, m)))
        sheet.rows.append(row)
    return sheet


def _delta_header(metric: str) -> str:
    return "Δlog10" if metric in LOG_METRICS else "Δ"


def _compare_cells(metric: str, record: dict | None) -> list[str]:
    if record is None:
        return ["-", "-", "n/a"]
    return [record["ours_text"], fmt(record["published"]), fmt_diff(metric, record["diff"])]


def _notes(tables: list[Table], compare: bool) -> list[str]:
    notes = []
    if any(c.partial for t in tables for c in t.cells.values()):
        notes.append(
            "`*` partial result (--limit, or an interrupted evaluation): not comparable with the published numbers."
        )
    for t in tables:
        for c in sorted(t.cells.values(), key=lambda c: (c.task, c.method)):
            if c.selected_by:
                notes.append(f"{t.model} {c.task} {c.display}: showing configuration {c.config}, {c.selected_by}.")
            elif c.other_configs:
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
        if any(t.model not in t.published_models and len(t.compare_with) > 1 for t in tables):
            notes.append(
                "Models without a published counterpart (e.g. the embedded `tiny`) are shown against each published "
                "model for orientation: they check the pipeline, not the published numbers."
            )
    return notes


def render_markdown(tables: list[Table], published: dict | None) -> str:
    out = ["# Results", ""]
    for t in tables:
        out += [f"## {t.title} · {t.model}", "", f"_{seed_line(t)}_", "", to_markdown(results_sheet(t)), ""]
        if published is None:
            continue
        if not t.compare_with:
            out += [f"_No published numbers for {t.title} · {t.model}._", ""]
        for pub_model in t.compare_with:
            out += [f"### {t.title} · {t.model} vs published {pub_model}", ""]
            for split, part in comparison_sheet(t, comparison_rows(t, published, pub_model)).by_group():
                out += [f"**{split}**", "", to_markdown(part), ""]
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
        caption = f"<h2>{e(t.title)} · {e(t.model)}</h2><p><em>{e(seed_line(t))}</em></p>"
        out.append(caption + to_html(results_sheet(t)))
        if published is None:
            continue
        if not t.compare_with:
            out.append(f"<p><em>No published numbers for {e(t.title)} · {e(t.model)}.</em></p>")
        for pub_model in t.compare_with:
            sheet = comparison_sheet(t, comparison_rows(t, published, pub_model))
            caption = f"<h3>{e(t.title)} · {e(t.model)} vs published {e(pub_model)}</h3>"
            out.append(caption + to_html(sheet, header_cells_per_line=3))
    notes = _notes(tables, published is not None)
    if notes:
        out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_timing(tables: list[Table]) -> str:
    """Wall time per run (Markdown): what a cell of the grid costs on this hardware."""
    out = []
    for t in tables:
        sheet = Sheet(["method"] + [split for _, split in t.splits])
        for display in t.rows:
            sheet.rows.append([display] + [_time_text(t.cells.get((display, task))) for task, _ in t.splits])
        out += [f"## Wall time (s) · {t.title} · {t.model}", "",
                "_training + scoring = total, mean over seeds; baseline rows are only scored_", "",
                to_markdown(sheet), ""]
    return "\n".join(out)


def _time_text(cell: Cell | None) -> str:
    sec = cell.seconds if cell else {}
    if "train" in sec and "eval" in sec:
        return f"{sec['train']:.0f} + {sec['eval']:.0f} = {sec['train'] + sec['eval']:.0f}"
    if sec:  # one part recorded: say which
        return " ".join(f"{v:.0f} ({'training' if k == 'train' else 'scoring'})" for k, v in sec.items())
    return "-"


def render_csv(tables: list[Table], published: dict | None) -> str:
    """Long format, the published CSVs' columns first (so a results CSV can itself be a --compare source)."""
    sheet = Sheet(CSV_COLUMNS + (COMPARE_COLUMNS if published is not None else []))
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
                        str(stat.n),
                        " ".join(map(str, cell.seeds)),
                        str(cell.partial).lower(),
                    ]
                    if published is None:
                        sheet.rows.append(base)
                        continue
                    for pub_model, r in compare_rows.get((display, task, m)) or [("", None)]:
                        if r is None:
                            sheet.rows.append(base + ["", "", "", ""])
                        else:
                            gap = [pub_model, fmt(r["published"]), fmt_diff(m, r["diff"]), r["diff_kind"]]
                            sheet.rows.append(base + gap)
    return to_csv(sheet)


def to_json(tables: list[Table], published: dict | None) -> dict:
    """Full precision: every metric a run reported, not only the table's headline ones."""
    out = {"tables": [], "notes": _notes(tables, published is not None)}
    for t in tables:
        rows = Sheet(JSON_ROW_FIELDS)
        for display in t.rows:
            for task, split in t.splits:
                cell = t.cells.get((display, task))
                if cell is None:
                    continue
                metrics = {
                    name: {"mean": s.mean, "std": s.std, "n": s.n, "values": s.values}
                    for name, s in cell.stats.items()
                }
                rows.rows.append(
                    [display, cell.method, split, task, cell.config, cell.seeds, cell.partial, metrics]
                )
        entry = {
            "benchmark": t.benchmark,
            "model": t.model,
            "splits": [s for _, s in t.splits],
            "metrics": t.metrics,
            "better": t.better,
            "rows": to_records(rows),
            "comparison": {},
        }
        if published is not None:
            for pub_model in t.compare_with:
                entry["comparison"][pub_model] = [
                    {k: v for k, v in r.items() if k != "ours_text"}
                    for r in comparison_rows(t, published, pub_model)
                ]
        out["tables"].append(entry)
    return out
