"""Result files of one scored task: the open-unlearning ``<BENCH>_EVAL.json`` / ``_SUMMARY.json`` export,
``samples.jsonl`` and ``scores.json`` (written last: it marks the run complete)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.io import write_json, write_jsonl
from harness.metrics import Score


def _plain(v):
    """JSON-safe: numpy scalars to float, NaN kept as in the reference's json.dump."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def export_entry(score: Score) -> dict:
    """One metric in the open-unlearning ``_EVAL.json`` layout."""
    e: dict[str, Any] = {"agg_value": _plain(score.value)}
    if score.per_sample is not None:
        e["value_by_index"] = {int(k): _plain(v) for k, v in score.per_sample.items()}
    for k, v in score.extra.items():
        e[k] = _plain(v)
    return e


def eval_log(scores: dict[str, Score]) -> dict:
    return {name: export_entry(s) for name, s in scores.items()}


def summary(scores: dict[str, Score], top: list[str]) -> dict:
    return {n: _plain(scores[n].value) for n in top if n in scores and scores[n].value is not None}


def sample_rows(scores: dict[str, Score]):
    """One samples.jsonl row per (metric, index) (and per MIA split), generations included."""
    for name, s in scores.items():
        if s.per_sample:
            for idx, v in s.per_sample.items():
                yield {"metric": name, "index": int(idx), **(v if isinstance(v, dict) else {"value": v})}
        for split in ("forget", "holdout"):
            sub = s.extra.get(split)
            if isinstance(sub, dict) and "value_by_index" in sub:
                for idx, v in sub["value_by_index"].items():
                    yield {"metric": name, "split": split, "index": int(idx), **v}


def write_outputs(out_dir: Path, task, scores: dict[str, Score], registry, top: list[str], *,
                  model_label: str, partial: bool, settings: dict, identity: dict | None = None) -> None:
    """samples.jsonl, <BENCH>_EVAL.json, <BENCH>_SUMMARY.json, then scores.json (completion marker)."""
    out_dir = Path(out_dir)
    bench = task.benchmark
    write_jsonl(out_dir / "samples.jsonl", sample_rows(scores))
    write_json(out_dir / f"{bench}_EVAL.json", eval_log(scores), indent=4, sort_keys=True)
    write_json(out_dir / f"{bench}_SUMMARY.json", summary(scores, top), indent=4, sort_keys=True)
    metrics = {}
    for n, s in scores.items():
        m = registry.metrics.get(n)
        metrics[n] = {"value": _plain(s.value), "better": getattr(m, "better", None),
                      "version": getattr(m, "version", None), "top_level": n in top}
    # benchmark + report layout make a results tree self-describing: `harness report` needs no task registry
    layout = {"benchmark": task.benchmark}
    if task.report is not None:
        layout["report"] = task.report.to_dict()
    write_json(out_dir / "scores.json", {"task": task.name, "task_version": task.version, "model": model_label,
                                         **(identity or {}), **layout, "partial": partial, "eval": settings,
                                         "metrics": metrics})
