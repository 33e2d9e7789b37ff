"""The published numbers: the shipped CSVs, which published model a results model is compared with,
and the gap between ours and theirs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from harness import HarnessError
from harness.paths import bundled_dir
from harness.report.layout import builtin_published_models

PUBLISHED_DIR = bundled_dir() / "published"
# Gaps on these metrics are reported in log10: p-values span hundreds of orders of magnitude.
LOG_METRICS = frozenset({"forget_quality"})


def load_published(source: Path | None = None, names=None) -> dict[tuple[str, str, str, str, str], float | None]:
    """(benchmark, model, method, split, metric) -> value from the published CSVs (a file or a folder);
    ``names``: with no ``source``, only these files of the shipped folder (the tables' ``report.published``)."""
    if source is None and names is not None:
        files = [PUBLISHED_DIR / n for n in dict.fromkeys(names)]
        for f in files:
            if not f.is_file():
                raise HarnessError(f"report.published: {f.name} is not among the shipped tables in {PUBLISHED_DIR}")
        return _read_csvs(files)
    source = PUBLISHED_DIR if source is None else Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.csv"))
    elif source.is_file():
        files = [source]
    else:
        raise HarnessError(f"--compare {source}: no such file or folder")
    if not files:
        raise HarnessError(f"--compare {source}: no .csv files there")
    return _read_csvs(files)


def _read_csvs(files: list[Path]) -> dict[tuple[str, str, str, str, str], float | None]:
    wanted = ["benchmark", "model", "method", "split", "metric", "value"]
    table: dict[tuple[str, str, str, str, str], float | None] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in wanted if c not in (reader.fieldnames or [])]
            if missing:
                raise HarnessError(f"{path}: columns {missing} missing; expected header {','.join(wanted)}")
            for row in reader:
                text = (row["value"] or "").strip()
                try:
                    value = float(text) if text and text.lower() not in {"n/a", "nan", "none"} else None
                except ValueError as exc:
                    raise HarnessError(f"{path}: value {text!r} is not a number") from exc
                key = (row["benchmark"], row["model"], row["method"], row["split"], row["metric"])
                table[key] = value
    return table


def published_model_names(model: str, benchmark: str, published: dict, models: dict | None = None) -> list[str]:
    """The published model(s) a results model is compared with.

    The same name matches first; profiles map by name (``models``: the family's
    ``report.published_models``, by default those of every built-in family); a hub id or folder
    containing a published name maps to it (longest match); anything else (the embedded `tiny`
    model) is shown against every published model of the benchmark, for orientation only.
    """
    models = builtin_published_models() if models is None else models
    names = sorted({k[1] for k in published if k[0] == benchmark})
    if model in names:  # e.g. a results CSV of ours used as the comparison
        return [model]
    if model in models:
        return [models[model]] if models[model] in names else []
    contained = [n for n in names if n.lower() in model.lower()]
    if contained:
        return [max(contained, key=len)]
    return names


def is_counterpart(model: str, published_model: str, models: dict | None = None) -> bool:
    """True when `published_model` is the same model as ours (not a fallback for orientation)."""
    models = builtin_published_models() if models is None else models
    return (
        model == published_model
        or models.get(model) == published_model
        or published_model.lower() in model.lower()
    )


def difference(metric: str, ours: float | None, published: float | None) -> float | None:
    """ours - published; in log10 for forget quality. None (n/a) when a finite gap does not exist."""
    if ours is None or published is None:
        return None
    if metric in LOG_METRICS:
        if ours <= 0 or published <= 0:
            return None
        return math.log10(ours) - math.log10(published)
    return ours - published
