"""The report's figure: forget quality against model utility (TOFU), forgetting against retained
knowledge (MUSE)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from harness import HarnessError
from harness.io import write_bytes
from harness.report.published import is_counterpart
from harness.report.tables import Table
from harness.results.tables import row_key


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
    methods = sorted({d for t in panels for d in t.rows}, key=row_key)
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
    write_bytes(path, buf.getvalue())
    return path
