"""The report's attack section: per method, each re-scored metric before and after each attack (seed mean
± sample std, as in the main tables) and the recovered fraction

    recovered = (after - before) / (finetuned - before)

where ``before`` is the unlearned model on the rows the attack is scored on, and ``finetuned`` the
Finetuned row's un-attacked value on the same rows (its ``before``): 0 means the attack brought nothing
back, 1 all the way to the model before unlearning. n/a where the Finetuned row is missing or unlearning
did not move the metric."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from harness.io import write_bytes
from harness.report.load import Cell, Stat
from harness.report.tables import ATTACK, fmt
from harness.results.tables import Sheet, row_key, to_markdown

FINETUNED = "finetuned"


@dataclass
class AttackRow:
    model: str
    task: str
    method: str  # display name
    attack: str
    metric: str
    before: Stat | None
    after: Stat | None
    recovered: float | None


def _parse(name: str) -> tuple[str, str, bool] | None:
    """``attack/<a>/<m>`` -> (a, m, False); ``attack/<a>/before/<m>`` -> (a, m, True)."""
    if not name.startswith(ATTACK):
        return None
    attack, _, rest = name[len(ATTACK):].partition("/")
    before = rest.startswith("before/")
    return attack, rest[len("before/"):] if before else rest, before


def attack_rows(cells: list[Cell]) -> list[AttackRow]:
    ft = {(c.model, c.task): c for c in cells if c.method == FINETUNED}
    rows = []
    for c in sorted(cells, key=lambda c: (c.model, c.task, row_key(c.display))):
        pairs = sorted({(p[0], p[1]) for n in c.stats if (p := _parse(n))})
        for attack, metric in pairs:
            before = c.stats.get(f"{ATTACK}{attack}/before/{metric}")
            after = c.stats.get(f"{ATTACK}{attack}/{metric}")
            base = ft.get((c.model, c.task))
            fb = base.stats.get(f"{ATTACK}{attack}/before/{metric}") if base and c.method != FINETUNED else None
            rows.append(AttackRow(c.model, c.task, c.display, attack, metric, before, after,
                                  recovered(before, after, fb)))
    return rows


def recovered(before: Stat | None, after: Stat | None, finetuned: Stat | None) -> float | None:
    vals = [s.mean if s is not None else None for s in (before, after, finetuned)]
    if any(v is None or not math.isfinite(v) for v in vals):
        return None
    b, a, f = vals
    if abs(f - b) <= 1e-12 * max(1.0, abs(f)):
        return None
    return (a - b) / (f - b)


def attacks_json(cells: list[Cell]) -> list[dict]:
    def stat(s: Stat | None):
        return None if s is None else {"mean": s.mean, "std": s.std, "n": s.n}

    return [{"model": r.model, "task": r.task, "method": r.method, "attack": r.attack, "metric": r.metric,
             "before": stat(r.before), "after": stat(r.after), "recovered": r.recovered} for r in attack_rows(cells)]


def _text(s: Stat | None) -> str:
    if s is None or s.mean is None:
        return "-"
    return fmt(s.mean) + (f" ± {fmt(s.std)}" if s.std is not None else "")


def render_attacks(cells: list[Cell]) -> str:
    """The Markdown section (empty when no run was attacked)."""
    rows = attack_rows(cells)
    if not rows:
        return ""
    out = ["## Attacks: before and after", "",
           "_recovered = (after - before) / (finetuned - before), on the rows each attack is scored on "
           "(docs/attacks.md)_", ""]
    for (model, task), group in _groups(rows).items():
        sheet = Sheet(["method", "attack", "metric", "before", "after", "recovered"],
                      [[r.method, r.attack, r.metric, _text(r.before), _text(r.after),
                        "n/a" if r.recovered is None else f"{r.recovered:.2f}"] for r in group])
        out += [f"### {task} · {model}", "", to_markdown(sheet), ""]
    return "\n".join(out)


def _groups(rows: list[AttackRow]) -> dict[tuple[str, str], list[AttackRow]]:
    out: dict[tuple[str, str], list[AttackRow]] = {}
    for r in rows:
        out.setdefault((r.model, r.task), []).append(r)
    return out


def plot_attacks(cells: list[Cell], path: Path) -> Path | None:
    """Before-vs-after bars per method: one panel per (task, model, attack), its first re-scored metric."""
    rows = attack_rows(cells)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str, str], list[AttackRow]] = {}
    for r in rows:
        panels.setdefault((r.task, r.model, r.attack), []).append(r)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((task, model, attack), group) in zip(axes.flat, panels.items()):
        metric = group[0].metric
        group = [r for r in group if r.metric == metric]
        xs = range(len(group))
        for off, key, label in ((-0.2, "before", "before"), (0.2, "after", f"after {attack}")):
            stats = [getattr(r, key) for r in group]
            ax.bar([x + off for x in xs], [s.mean if s and s.mean is not None else 0 for s in stats], 0.4,
                   yerr=[s.std if s and s.std is not None else 0 for s in stats], label=label, capsize=3)
        ax.set_xticks(list(xs), [r.method for r in group], rotation=30, ha="right")
        ax.set_title(f"{task} · {model}: {attack}")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(Path(path), buf.getvalue())
    return Path(path)
