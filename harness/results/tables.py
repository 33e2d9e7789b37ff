"""The one table formatter: a header and rows of cells, printed as Markdown, HTML, CSV, JSON or console
text; also the metric arrows and the methods' display names and published row order."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass, field

from harness.metrics import ARROWS

__all__ = ["ARROWS", "DISPLAY_NAMES", "ROW_ORDER", "Sheet", "console_value", "display_name", "row_key", "to_console",
           "to_csv", "to_html", "to_json", "to_markdown", "to_plain", "to_records"]

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


def display_name(method: str, recorded: str | None = None) -> str:
    """The name a scores.json recorded for its method, else the published one, else the method's own."""
    return str(recorded or DISPLAY_NAMES.get(method, method))


def row_key(display: str) -> tuple[int, str]:
    """Sort key for rows: the published order, then the other methods alphabetically."""
    return (ROW_ORDER.index(display), "") if display in ROW_ORDER else (len(ROW_ORDER), display.lower())


@dataclass
class Sheet:
    """A table: `header` names the columns, each row holds one cell per column.

    `groups` are (label, width) spans over the columns after the first (the row labels), left to
    right. HTML draws them as a header row of their own; the other printers fold the label into each
    column's name ("forget01 model_utility").
    """

    header: list[str]
    rows: list[list] = field(default_factory=list)
    groups: list[tuple[str, int]] = field(default_factory=list)

    def flat_header(self) -> list[str]:
        if not self.groups:
            return list(self.header)
        labels = [label for label, width in self.groups for _ in range(width)]
        return self.header[:1] + [f"{g} {h}" for g, h in zip(labels, self.header[1:])]

    def by_group(self) -> list[tuple[str, Sheet]]:
        """One sheet per column group, each keeping the row-label column."""
        out, start = [], 1
        for label, width in self.groups:
            cols = [0, *range(start, start + width)]
            part = Sheet([self.header[i] for i in cols], [[r[i] for i in cols] for r in self.rows])
            out.append((label, part))
            start += width
        return out


def to_markdown(sheet: Sheet) -> str:
    header = sheet.flat_header()
    lines = [_pipe_row(header), "|" + "---|" * len(header)]
    lines += [_pipe_row(map(str, r)) for r in sheet.rows]
    return "\n".join(lines)


def to_console(sheet: Sheet) -> str:
    """Markdown-shaped, with columns padded to line up in a terminal."""
    body = [sheet.flat_header(), *([str(c) for c in r] for r in sheet.rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
    lines = [_pipe_row(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def to_plain(sheet: Sheet, *, align: str = "", rule: bool = False, indent: str = "") -> str:
    """Space-aligned columns (``align``: one ``<`` or ``>`` per column, default left); ``rule`` underlines
    the header. The last left-aligned column is not padded, so lines carry no trailing blanks."""
    body = [sheet.flat_header(), *([str(c) for c in r] for r in sheet.rows)]
    n = len(body[0])
    align = align or "<" * n
    widths = [max(len(r[i]) for r in body) for i in range(n)]
    rows = body[:1] + ([["-" * w for w in widths]] if rule else []) + body[1:]

    def line(r):
        cells = [f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)]
        if align[-1] == "<":
            cells[-1] = r[-1]
        return indent + "  ".join(cells)

    return "\n".join(line(r) for r in rows)


def console_value(v) -> str:
    """A number as the console tables print it: 4 significant digits, scientific when tiny or huge."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4 or v != v):
        return f"{v:.3e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pipe_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def to_html(sheet: Sheet, *, header_cells_per_line: int = 1) -> str:
    """A <table> element; `header_cells_per_line` only sets the line breaks of the HTML source."""
    e = html.escape
    lines = ["<table>"]
    if sheet.groups:
        lines.append(f'<tr><th rowspan="2">{e(sheet.header[0])}</th>')
        lines += [f'<th colspan="{width}">{e(label)}</th>' for label, width in sheet.groups]
        lines.append("</tr><tr>")
        cells = [f"<th>{e(h)}</th>" for h in sheet.header[1:]]
        n = header_cells_per_line
        lines += ["".join(cells[i : i + n]) for i in range(0, len(cells), n)]
        lines.append("</tr>")
    else:
        lines.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in sheet.header) + "</tr>")
    lines += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in sheet.rows]
    lines.append("</table>")
    return "\n".join(lines)


def to_csv(sheet: Sheet) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(sheet.flat_header())
    writer.writerows(sheet.rows)
    return buf.getvalue()


def to_records(sheet: Sheet) -> list[dict]:
    """One {column: cell} object per row, for embedding in a larger JSON document."""
    header = sheet.flat_header()
    return [dict(zip(header, r)) for r in sheet.rows]


def to_json(sheet: Sheet) -> str:
    return json.dumps(to_records(sheet), indent=2, ensure_ascii=False) + "\n"
