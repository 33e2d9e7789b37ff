"""``harness report --curves``: the training curves of each run from its ``train_log.jsonl``: the train loss
and every metric ``--eval-every`` scored (``eval/<metric>``), over optimizer steps. One row of panels per
(model, task); one colour per method, each seed a thin line, the mean of a configuration's seeds a thick one
where it has several (the points of a sweep are lines of their own); a star marks the step ``--keep-best``
kept."""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

from harness import HarnessError
from harness.io import write_bytes
from harness.report.load import RunScores
from harness.results.tables import row_key

LOSS = "loss"


def read_log(run_dir: Path) -> list[dict]:
    """The rows of a run's ``train_log.jsonl`` (a torn last line of an interrupted run is left out)."""
    rows = []
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows that carry a finite value of it."""
    pts = [(int(r["step"]), float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def _keep_best(run: RunScores) -> dict | None:
    try:
        return json.loads(run.path.read_text(encoding="utf-8")).get("keep_best")
    except (OSError, ValueError):
        return None


def plot_curves(runs: list[RunScores], path: Path) -> Path:
    """Write the curves figure of ``runs`` (those with a train log) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[tuple[str, str], list[tuple[RunScores, list[dict]]]] = defaultdict(list)
    for run in runs:
        rows = read_log(run.path.parent)
        if rows:
            groups[(run.model, run.task)].append((run, rows))
    if not groups:
        raise HarnessError(f"--curves {path}: no run here has a train_log.jsonl (runs of `harness run`; "
                           "score during training with --eval-every)")
    panels = {}
    for key, items in groups.items():
        seen = dict.fromkeys(k for _, rows in items for r in rows for k in r if k.startswith("eval/"))
        names = [k for k in seen if k != "eval/best_step"]  # in the order the log has them
        panels[key] = [LOSS, *names]
    methods = sorted({run.display for items in groups.values() for run, _ in items}, key=row_key)
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(methods)}
    ncols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(groups), ncols, figsize=(4.2 * ncols + 1.6, 3.4 * len(groups)), squeeze=False)
    for r, (key, items) in enumerate(sorted(groups.items())):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(panels[key]):
                ax.set_visible(False)
                continue
            metric = panels[key][c]
            better = next((run.better.get(metric[len("eval/"):]) for run, _ in items
                           if run.better.get(metric[len("eval/"):])), None)
            by_config: dict[tuple[str, str], list[tuple[list[int], list[float]]]] = defaultdict(list)
            for run, rows in items:
                xs, ys = series(rows, metric)
                if not xs:
                    continue
                by_config[(run.display, run.config)].append((xs, ys))
                ax.plot(xs, ys, color=colours[run.display], linewidth=0.9, alpha=0.55, marker="." if len(xs) < 30 else None)
                best = _keep_best(run)
                if best and best.get("step") is not None and metric == f"eval/{best.get('metric')}":
                    at = dict(zip(xs, ys)).get(int(best["step"]))
                    if at is not None:
                        ax.plot([best["step"]], [at], marker="*", markersize=13, color=colours[run.display],
                                markeredgecolor="black", linestyle="none")
            for (display, _), lines in by_config.items():
                if len(lines) > 1:  # the mean of one configuration's seeds, at the steps every seed logged
                    common = sorted(set.intersection(*(set(xs) for xs, _ in lines)))
                    means = [sum(dict(zip(xs, ys))[s] for xs, ys in lines) / len(lines) for s in common]
                    ax.plot(common, means, color=colours[display], linewidth=2.4)
            label = "train loss" if metric == LOSS else metric[len("eval/"):]
            words = {"higher": "higher is better", "lower": "lower is better", "zero": "closer to 0 is better"}
            ax.set_title(f"{label} ({words[better]})" if better in words else label, fontsize=9)
            ax.set_xlabel("optimizer step", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{key[1]}\n{key[0]}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[d], linewidth=2, label=d) for d in methods]
    handles.append(Line2D([], [], color="grey", marker="*", markersize=11, markeredgecolor="black",
                          linestyle="none", label="kept (--keep-best)"))
    fig.legend(handles=handles, title="method (thin: a seed)", loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4.2 * ncols + 1.6), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # rendered in memory first: an interrupted report never leaves a truncated PNG
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
