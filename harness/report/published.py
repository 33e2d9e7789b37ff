"""The published numbers: the shipped CSVs, which published model a results model is compared with,
and the gap between ours and theirs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from harness import HarnessError
from harness.paths import bundled_dir

PUBLISHED_DIR = bundled_dir() / "published"

# Our model profiles -> model names in the published CSVs.
PUBLISHED_MODELS = {
    "llama2-7b-chat": "Llama-2-7b-chat-hf",
    "llama3.2-1b-instruct": "Llama-3.2-1B-Instruct",
    "llama2-7b": "Llama-2-7b-hf",
}
# Gaps on these metrics are reported in log10: p-values span hundreds of orders of magnitude.
LOG_METRICS = frozenset({"forget_quality"})


def load_published(source: Path | None = None) -> dict[tuple[str, str, str, str, str], float | None]:
    """(benchmark, model, method, split, metric) -> value from the published CSVs (a file or a folder)."""
    source = PUBLISHED_DIR if source is None else Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.csv"))
    elif source.is_file():
        files = [source]
    else:
        raise HarnessError(f"--compare {source}: no such file or folder")
    if not files:
        raise HarnessError(f"--compare {source}: no .csv files there")
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


def published_model_names(model: str, benchmark: str, published: dict) -> list[str]:
    """The published model(s) a results model is compared with.

    The same name matches first; profiles map by name; a hub id or folder containing a published name maps to it (longest match);
    anything else (the embedded `tiny` model) is shown against every published model of the
    benchmark, for orientation only.
    """
    names = sorted({k[1] for k in published if k[0] == benchmark})
    if model in names:  # e.g. a results CSV of ours used as the comparison
        return [model]
    if model in PUBLISHED_MODELS:
        return [PUBLISHED_MODELS[model]] if PUBLISHED_MODELS[model] in names else []
    contained = [n for n in names if n.lower() in model.lower()]
    if contained:
        return [max(contained, key=len)]
    return names


def is_counterpart(model: str, published_model: str) -> bool:
    """True when `published_model` is the same model as ours (not a fallback for orientation)."""
    return (
        model == published_model
        or PUBLISHED_MODELS.get(model) == published_model
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
