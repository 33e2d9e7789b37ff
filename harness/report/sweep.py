"""The forget/utility trade-off of a sweep: per (model, task, method), the best point under a selection rule.

Default rule (per task family, from its plot axes ``report.plot``: x = utility, y = forgetting): among the
points whose utility is at least ``fraction`` x the Finetuned row's (TOFU: model_utility; MUSE:
retain_knowmem_ROUGE), the best forgetting (TOFU: highest forget_quality; MUSE: lowest
forget_verbmem_ROUGE). ``--best METRIC`` replaces the objective (its direction is the metric's
``better``); the utility floor still applies (``--utility-fraction 0`` lifts it). Complete points rank
before partial (--limit) ones. Without a Finetuned row the floor cannot be placed, so nothing is selected
and the report says why."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.report.load import Cell
from harness.results.tables import Sheet, row_key

REFERENCE_ROWS = ("finetuned", "retain")  # `harness eval --name` rows, not sweep points


@dataclass
class Choice:
    model: str
    task: str
    method: str
    display: str
    objective: str | None
    utility: str | None
    points: list[Cell]
    best: Cell | None = None
    floor: float | None = None  # the utility a point must keep
    reason: str = ""  # why nothing was selected
    varying: list[str] = field(default_factory=list)  # hyper-parameters that differ between the points

    def rule(self, fraction: float) -> str:
        if not self.objective:
            return "none (no plot axes: --best METRIC)"
        if not self.utility or not fraction:
            return f"best {self.objective}"
        return f"best {self.objective} with {self.utility} >= {fraction:g} x Finetuned"


def references(cells: list[Cell]) -> dict[tuple[str, str, str], Cell]:
    """(model, task, row) -> the Finetuned / Retain cell (its newest complete configuration)."""
    refs = build_cells_of([c for c in cells if c.method in REFERENCE_ROWS])
    return {(c.model, c.task, c.method): c for c in refs}


def build_cells_of(points: list[Cell]) -> list[Cell]:
    """The report's usual one-configuration-per-row choice, over already aggregated points."""
    best: dict[tuple, Cell] = {}
    for c in points:
        key = (c.model, c.task, c.method)
        if key not in best or (not c.partial, c.config) > (not best[key].partial, best[key].config):
            best[key] = c
    return list(best.values())


def select(points: list[Cell], fraction: float, objective: str | None = None) -> list[Choice]:
    """One Choice per (model, task, method) that has points (reference rows excluded)."""
    refs = references(points)
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for c in points:
        if c.method not in REFERENCE_ROWS:
            groups.setdefault((c.model, c.task, c.method), []).append(c)
    out = []
    for (model, task, method), group in groups.items():
        group.sort(key=lambda c: c.config)
        axes = (group[0].family.layout.plot if group[0].family else None) or {}
        ch = Choice(model, task, method, group[0].display, objective or axes.get("y"), axes.get("x"), group,
                    varying=_varying(group))
        out.append(ch)
        if not ch.objective:
            ch.reason = f"task {task} has no plot axes to select by; pass --best METRIC"
            continue
        candidates = [c for c in group if _mean(c, ch.objective) is not None]
        if not candidates:
            ch.reason = f"no point reports {ch.objective}"
            continue
        if ch.utility and fraction:
            base = refs.get((model, task, "finetuned"))
            base_u = _mean(base, ch.utility) if base else None
            if base_u is None:
                ch.reason = (f"no Finetuned row with {ch.utility} for {task}: the utility floor cannot be placed "
                             "(score it with `harness run`, or pass --utility-fraction 0)")
                continue
            ch.floor = fraction * base_u
            candidates = [c for c in candidates if _mean(c, ch.utility) is not None
                          and _mean(c, ch.utility) >= ch.floor]
            if not candidates:
                top = max((_mean(c, ch.utility) for c in group if _mean(c, ch.utility) is not None), default=None)
                ch.reason = (f"no point keeps {ch.utility} >= {ch.floor:.3g} ({fraction:g} x Finetuned)"
                             + (f"; the best kept {top:.3g}" if top is not None else ""))
                continue
        direction = group[0].better.get(ch.objective) or "higher"
        ch.best = max(candidates, key=lambda c: (not c.partial, _score(_mean(c, ch.objective), direction),
                                                 _mean(c, ch.utility) if ch.utility else 0, c.config))
    out.sort(key=lambda ch: (ch.model, ch.task, row_key(ch.display)))
    return out


def preferred(choices: list[Choice], fraction: float) -> dict[tuple, tuple[str, str]]:
    """What the published-layout tables show for a swept method: its selected point."""
    return {(ch.model, ch.task, ch.method): (ch.best.config, f"best of {len(ch.points)} sweep points "
                                             f"({ch.rule(fraction)})")
            for ch in choices if ch.best is not None and len(ch.points) > 1}


def is_sweep(choices: list[Choice]) -> bool:
    return any(len(ch.points) > 1 for ch in choices)


def _score(value: float, direction: str) -> float:
    return value if direction == "higher" else -abs(value) if direction == "zero" else -value


def _mean(cell: Cell | None, metric: str | None) -> float | None:
    stat = cell.stats.get(metric) if cell is not None and metric else None
    return stat.mean if stat is not None else None


def _varying(group: list[Cell]) -> list[str]:
    keys = list(dict.fromkeys(k for c in group for k in c.hparams))
    return [k for k in keys if len({repr(c.hparams.get(k)) for c in group}) > 1]


def hparam_text(ch: Choice, cell: Cell) -> str:
    keys = ch.varying or [k for k in ("lr", "epochs") if k in cell.hparams]
    return ", ".join(f"{k}={cell.hparams.get(k)}" for k in keys) or "-"


def choice_sheet(choices: list[Choice], fraction: float, *, flat: bool = False) -> Sheet:
    """The selected table: one row per (model, task, method), full precision (JSON export; ``flat``: the
    hyper-parameters as ``k=v; k=v`` and the seeds as ``0,1`` for CSV)."""
    sheet = Sheet(["model", "task", "method", "points", "rule", "config", "hparams", "objective", "objective_value",
                   "utility", "utility_value", "utility_floor", "seeds", "partial", "note"])
    for ch in choices:
        b = ch.best
        sheet.rows.append([ch.model, ch.task, ch.display, len(ch.points), ch.rule(fraction),
                           b.config if b else None, dict((k, b.hparams.get(k)) for k in
                                                         (ch.varying or ["lr", "epochs"])) if b else None,
                           ch.objective, _mean(b, ch.objective), ch.utility, _mean(b, ch.utility), ch.floor,
                           b.seeds if b else None, b.partial if b else None, ch.reason])
    if flat:
        for row in sheet.rows:
            row[6] = "; ".join(f"{k}={v}" for k, v in row[6].items()) if row[6] else ""
            row[12] = ",".join(map(str, row[12])) if row[12] else ""
    return sheet


def markdown_sheet(choices: list[Choice], fraction: float) -> Sheet:
    """The same table for reading: values in 3 significant digits, hyper-parameters as key=value."""
    from harness.report.tables import fmt

    sheet = Sheet(["task", "method", "points", "best point", "hyper-parameters", "forgetting", "utility",
                   "utility floor"])
    for ch in choices:
        b = ch.best
        forget = f"{ch.objective} {fmt(_mean(b, ch.objective))}" if b else "-"
        util = f"{ch.utility} {fmt(_mean(b, ch.utility))}" if b and ch.utility else "-"
        floor = fmt(ch.floor) if ch.floor is not None else "-"
        sheet.rows.append([ch.task, ch.display, str(len(ch.points)), b.config if b else f"none: {ch.reason}",
                           hparam_text(ch, b) if b else "-", forget, util, floor])
    return sheet


__all__ = ["Choice", "choice_sheet", "is_sweep", "markdown_sheet", "preferred", "references",
           "select"]
