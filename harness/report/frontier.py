"""The sweep figure: per task, every method's points in the family's plot plane (TOFU: forget_quality
against model_utility; MUSE: forget_verbmem_ROUGE against retain_knowmem_ROUGE), each method's Pareto
front, its selected point (star), the utility floor, and the Finetuned / Retain rows as references."""

from __future__ import annotations

import io
import math
from pathlib import Path

from harness import HarnessError
from harness.io import write_bytes
from harness.report.load import Cell
from harness.report.sweep import Choice, references


def pareto(points: list[tuple[float, float]], x_better: str, y_better: str) -> list[tuple[float, float]]:
    """The non-dominated points (no other point at least as good on both axes and better on one), by x."""
    def key(p):
        return (_good(p[0], x_better), _good(p[1], y_better))

    front = [p for p in points
             if not any(key(q)[0] >= key(p)[0] and key(q)[1] >= key(p)[1] and key(q) != key(p) for q in points)]
    return sorted(set(front))


def _good(v: float, better: str) -> float:
    return v if better == "higher" else -abs(v) if better == "zero" else -v


def plot_fronts(choices: list[Choice], points: list[Cell], path: Path, fraction: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[Choice]] = {}
    for ch in choices:
        if ch.points[0].family and ch.points[0].family.layout.plot:
            panels.setdefault((ch.model, ch.task), []).append(ch)
    if not panels:
        raise HarnessError(f"--plot {path}: no sweep results of a task family with plot axes (report.plot)")
    refs = references(points)
    methods = sorted({ch.display for chs in panels.values() for ch in chs})
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(methods)}
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 5.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((model, task), chs) in zip(axes.flat, sorted(panels.items())):
        axes_spec = chs[0].points[0].family.layout.plot
        xm, ym, logy = axes_spec["x"], axes_spec["y"], bool(axes_spec.get("log_y"))
        better = {**chs[0].points[0].better}
        for ch in chs:
            xy = [(c.stats[xm].mean, c.stats[ym].mean) for c in ch.points
                  if c.stats.get(xm) and c.stats.get(ym) and c.stats[xm].mean is not None
                  and c.stats[ym].mean is not None and not (logy and c.stats[ym].mean <= 0)]
            if not xy:
                continue
            colour = colours[ch.display]
            ax.scatter(*zip(*xy), color=colour, alpha=0.45, s=28, label=f"{ch.display} ({len(ch.points)} points)")
            front = pareto(xy, better.get(xm, "higher"), better.get(ym, "higher"))
            ax.plot(*zip(*front), color=colour, linewidth=1.5, drawstyle="default")
            b = ch.best
            if b is not None and b.stats.get(xm) and b.stats.get(ym) and b.stats[ym].mean is not None:
                if not (logy and b.stats[ym].mean <= 0):
                    ax.scatter([b.stats[xm].mean], [b.stats[ym].mean], marker="*", s=260, color=colour,
                               edgecolor="black", zorder=5, label=f"{ch.display} best: {b.config}")
        for row, marker, colour in (("finetuned", "X", "black"), ("retain", "D", "green")):
            ref = refs.get((model, task, row))
            x, y = (ref.stats.get(xm), ref.stats.get(ym)) if ref else (None, None)
            if x and y and x.mean is not None and y.mean is not None and not (logy and y.mean <= 0):
                ax.scatter([x.mean], [y.mean], marker=marker, s=110, color=colour, zorder=6, label=row.capitalize())
        floors = {ch.floor for ch in chs if ch.floor is not None}
        for floor in floors:
            ax.axvline(floor, color="grey", linestyle="--", linewidth=1,
                       label=f"{xm} floor ({fraction:g} x Finetuned)")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(f"{xm} ({better.get(xm, 'higher')} is better)")
        ax.set_ylabel(f"{ym}{' (log scale)' if logy else ''} ({better.get(ym, 'higher')} is better)")
        ax.set_title(f"{task} · {model}: sweep points, Pareto fronts, best point (star)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())  # whole or not at all
    return path
