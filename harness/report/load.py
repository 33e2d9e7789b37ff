"""Reading scores.json trees into runs, and averaging the seeds of each (model, task, method)."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from harness import HarnessError
from harness.report.layout import Family, recorded
from harness.results.tables import display_name


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
    family: Family | None = None  # the table it belongs to; None: a table of its own
    hparams: dict = field(default_factory=dict)  # lr, epochs, METHOD.FIELD (scores.json, else config.yaml)


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
        display=display_name(method, data.get("method_display")),
        seed=int(seed),
        config=m["hash"] if m else path.parent.name,
        partial=bool(data.get("partial", False)),
        values=values,
        better=better,
        mtime=path.stat().st_mtime,
        seconds=_seconds(data),
        family=recorded(data, str(path), str(data["task"])),
        hparams=_hparams(data, path.parent, method),
    )


def _hparams(data: dict, run: Path, method: str) -> dict:
    """A sweep point's hyper-parameters: recorded by `harness run` in scores.json; for older runs, read
    from the config.yaml beside it (an eval of a checkpoint has none)."""
    if isinstance(data.get("hparams"), dict):
        return dict(data["hparams"])
    if not (run / "config.yaml").is_file():
        return {}
    from harness.io import read_yaml

    try:
        cfg = read_yaml(run / "config.yaml", what="run config")
    except HarnessError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    train, params = cfg.get("training") or {}, (cfg.get("method") or {}).get("params") or {}
    out = {k: train.get(k) for k in ("lr", "epochs", "batch_size") if k in train}
    out.update({f"{method}.{k}": v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))})
    return out


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
    # hidden folders are not results (e.g. the .previous/ copy an --overwrite keeps until it finishes)
    runs = [_read_scores(p) for p in sorted(results.rglob("scores.json"))
            if not any(part.startswith(".") for part in p.relative_to(results).parts[:-1])]
    if not runs:
        raise HarnessError(f"no scores.json under {results}; run `harness run ... -o {results}` first")
    if model:
        patterns = [p.strip() for p in model.split(",") if p.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.model, p) for p in patterns)]
        if not runs:
            raise HarnessError(f"--model {model}: no results for that model under {results}")
    return runs


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
    family: Family | None = None
    hparams: dict = field(default_factory=dict)
    selected_by: str = ""  # set when a sweep's selection rule chose this configuration among others


def aggregate(values: list[float | None]) -> Stat:
    present = [v for v in values if v is not None]
    if not present:
        return Stat(None, None, 0, values)
    mean = statistics.fmean(present)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(mean, std, len(present), values)


def build_cells(runs: list[RunScores], prefer: dict[tuple, tuple[str, str]] | None = None) -> list[Cell]:
    """Group runs by (model, task, method) and average their seeds.

    A cell holding several configurations (e.g. a --limit smoke run beside the full one, or a
    changed hyper-parameter) shows one: complete runs before partial ones, then the most recent;
    the others are named in the report's notes rather than mixed into one mean. ``prefer``:
    (model, task, method) -> (config, rule) chosen by a sweep's selection rule, shown instead.
    """
    prefer = prefer or {}
    groups: dict[tuple[str, str, str], dict[str, list[RunScores]]] = {}
    for r in runs:
        groups.setdefault((r.model, r.task, r.method), {}).setdefault(r.config, []).append(r)
    cells = []
    for (model, task, method), by_config in groups.items():
        chosen_config, rule = prefer.get((model, task, method), (None, ""))
        ranked = sorted(
            by_config.items(),
            key=lambda kv: (kv[0] == chosen_config, all(not r.partial for r in kv[1]),
                            max(r.mtime for r in kv[1]), kv[0]),
            reverse=True,
        )
        config, chosen = ranked[0]
        cells.append(_cell(model, task, method, config, chosen, [c for c, _ in ranked[1:]],
                           rule if config == chosen_config else ""))
    return cells


def config_cells(runs: list[RunScores]) -> list[Cell]:
    """One cell per (model, task, method, configuration): every point of a sweep, seeds averaged."""
    groups: dict[tuple[str, str, str, str], list[RunScores]] = {}
    for r in runs:
        groups.setdefault((r.model, r.task, r.method, r.config), []).append(r)
    return [_cell(*key, rs, []) for key, rs in groups.items()]


def _cell(model: str, task: str, method: str, config: str, chosen: list[RunScores], others: list[str],
          selected_by: str = "") -> Cell:
    chosen = sorted(chosen, key=lambda r: r.seed)
    names = sorted({name for r in chosen for name in r.values})
    better: dict[str, str] = {}
    for r in chosen:
        better.update(r.better)
    return Cell(
        model=model,
        task=task,
        method=method,
        display=chosen[0].display,
        config=config,
        seeds=[r.seed for r in chosen],
        partial=any(r.partial for r in chosen),
        stats={name: aggregate([r.values.get(name) for r in chosen]) for name in names},
        better=better,
        other_configs=others,
        seconds={k: aggregate([r.seconds.get(k) for r in chosen]).mean for k in ("train", "eval")
                 if any(k in r.seconds for r in chosen)},
        family=chosen[0].family,
        hparams=chosen[0].hparams,
        selected_by=selected_by,
    )
