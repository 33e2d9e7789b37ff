"""The report's figure: one panel per table whose family names plot axes (``report.plot`` in the task
YAML: forget quality against model utility for TOFU, forgetting against retained knowledge for MUSE)."""

from __future__ import annotations

import fnmatch
import io
import math
from pathlib import Path

from harness import HarnessError
from harness.io import write_bytes
from harness.report.published import is_counterpart
from harness.report.tables import Table
from harness.results.tables import row_key


def plot(tables: list[Table], path: Path, published: dict | None = None) -> Path:
    """The family's ``plot`` axes per method and split; hollow markers are the published points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [t for t in tables if t.plot]
    if not panels:
        raise HarnessError(f"--plot {path}: no results of a task family with plot axes (report.plot) to plot")
    methods = sorted({d for t in panels for d in t.rows}, key=row_key)
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(methods)}
    markers = ["o", "s", "^", "D", "v", "P"]

    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.8 * ncols + 1.6, 5.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, panels):
        xm, ym = t.plot["x"], t.plot["y"]
        logx, logy = bool(t.plot.get("log_x")), bool(t.plot.get("log_y"))
        split_marker = {task: markers[i % len(markers)] for i, (task, _) in enumerate(t.splits)}
        off_scale = []
        for display in t.rows:
            for task, split in t.splits:
                cell = t.cells.get((display, task))
                if cell is None:
                    continue
                x, y = axis_stat(cell.stats, xm), axis_stat(cell.stats, ym)
                if x is None or y is None or x.mean is None or y.mean is None:
                    continue
                if (logy and y.mean <= 0) or (logx and x.mean <= 0):
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
                    if px is None or py is None or (logy and py <= 0) or (logx and px <= 0):
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
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if t.plot.get("y_max") is not None:  # e.g. forget quality, a p-value: only error bars pass 1
            ax.set_ylim(top=float(t.plot["y_max"]))
        ax.set_xlabel(_axis_label(xm, logx, t.better.get(xm)))
        ax.set_ylabel(_axis_label(ym, logy, t.better.get(ym)))
        title = f"{t.title} · {t.model}"
        if pub_model:
            title += f"\nfilled: ours · hollow: published {pub_model}"
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        if off_scale:
            ax.text(
                0.01,
                0.01,
                f"off the log scale (<= 0), not drawn: {', '.join(off_scale)}",
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
    write_bytes(path, buf.getvalue())
    return path


def axis_stat(stats: dict, axis: str):
    """The value an axis reads: the metric of that name, else the first whose name matches it as an
    fnmatch pattern (WMDP plots ``wmdp_*/acc``: wmdp_bio/acc in one column group, wmdp_cyber/acc in the other)."""
    if axis in stats:
        return stats[axis]
    hits = sorted(m for m in stats if fnmatch.fnmatchcase(m, axis))
    return stats[hits[0]] if hits else None


def with_axes(tables: list[Table], x: str | None, y: str | None) -> None:
    """``--plot-x`` / ``--plot-y``: other axes than the family's (e.g. forget quality against mmlu/acc);
    the replaced axis drops the family's scale settings."""
    if not x and not y:
        return
    for t in tables:
        base = dict(t.plot or {})
        if x:
            base = {k: v for k, v in base.items() if k != "log_x"} | {"x": x}
        if y:
            base = {k: v for k, v in base.items() if k not in ("log_y", "y_max")} | {"y": y}
        t.plot = base if "x" in base and "y" in base else None


def _axis_label(metric: str, log: bool, better: str | None) -> str:
    words = {"higher": "higher is better", "lower": "lower is better", "zero": "closer to 0 is better"}
    notes = (["log scale"] if log else []) + ([words[better]] if better in words else [])
    return f"{metric} ({', '.join(notes)})" if notes else metric
