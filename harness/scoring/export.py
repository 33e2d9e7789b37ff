"""Result files of one scored task: the open-unlearning ``<BENCH>_EVAL.json`` / ``_SUMMARY.json`` export,
``samples.jsonl`` and ``scores.json`` (written last: it marks the run complete)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.io import finite_or_none, write_json, write_jsonl
from harness.metrics import Score, flat_scores
from harness.paths import safe_name
from harness.scoring.lmeval_results import lm_eval_results, n_samples_of, write_lm_eval


def _plain(v):
    """JSON-safe: numpy/torch scalars to Python numbers; NaN and infinities to None (strict JSON has no
    NaN; the reference's json.dump wrote a bare NaN, which most JSON readers refuse)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return finite_or_none(v)[0]


def _metric_value(v) -> dict:
    """scores.json's ``value``, with a ``reason`` when a non-finite number had to become null."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    value, kind = finite_or_none(v)
    if kind is None:
        return {"value": _plain(value)}
    return {"value": None, "reason": f"{kind}: the metric's value is not a finite number"}


def export_entry(score: Score) -> dict:
    """One metric in the open-unlearning ``_EVAL.json`` layout."""
    e: dict[str, Any] = {"agg_value": _plain(score.value)}
    if score.per_sample is not None:
        e["value_by_index"] = {int(k): _plain(v) for k, v in score.per_sample.items()}
    for k, v in score.extra.items():
        e[k] = _plain(v)
    return e


def own_export(scores: dict[str, Score]) -> dict[str, Score]:
    """The scores that go into the task's ``<BENCH>_EVAL.json``: not those that write export files of their own."""
    return {n: s for n, s in scores.items() if not s.exports}


def eval_log(scores: dict[str, Score]) -> dict:
    return {name: export_entry(s) for name, s in own_export(scores).items()}


def summary(scores: dict[str, Score], top: list[str]) -> dict:
    own = own_export(scores)
    return {n: _plain(own[n].value) for n in top if n in own and own[n].value is not None}


def sample_rows(scores: dict[str, Score]):
    """One samples.jsonl row per (metric, index) (and per MIA split), generations included."""
    for name, s in scores.items():
        if s.per_sample:
            for idx, v in s.per_sample.items():
                yield {"metric": name, "index": int(idx), **(v if isinstance(v, dict) else {"value": v})}
        for row in s.rows or ():
            yield {"metric": name, **row}
        for split in ("forget", "holdout"):
            sub = s.extra.get(split)
            if isinstance(sub, dict) and "value_by_index" in sub:
                for idx, v in sub["value_by_index"].items():
                    yield {"metric": name, "split": split, "index": int(idx), **v}


def write_outputs(out_dir: Path, task, scores: dict[str, Score], registry, top: list[str], *,
                  model_label: str, partial: bool, settings: dict, identity: dict | None = None,
                  lm_eval: dict | None = None, attacks=()) -> None:
    """samples.jsonl, <BENCH>_EVAL.json, <BENCH>_SUMMARY.json, results_<time>.json (lm-eval's layout; ``lm_eval``:
    its run details, see ``lmeval_results``), then scores.json (completion marker).
    ``attacks``: ``AttackOutcome``s; their scores go to the open-unlearning exports, samples.jsonl and
    scores.json as ``attack/<name>/<metric>`` (after the attack; ``attack/<name>/before/<metric>``: the
    un-attacked model on the same rows, scores.json only); the lm-eval file keeps the model's own metrics."""
    out_dir = Path(out_dir)
    bench = safe_name(task.benchmark, f"task '{task.name}' benchmark")
    after = {f"attack/{o.name}/{n}": s for o in attacks for n, s in o.after.items()}
    before = {f"attack/{o.name}/before/{n}": s for o in attacks for n, s in o.before.items()}
    write_jsonl(out_dir / "samples.jsonl", (_plain(r) for r in sample_rows({**scores, **after})))
    if own_export(scores) or not any(s.exports for s in scores.values()):
        write_json(out_dir / f"{bench}_EVAL.json", eval_log({**scores, **after}), indent=4, sort_keys=True)
        write_json(out_dir / f"{bench}_SUMMARY.json", summary({**scores, **after}, [*top, *after]), indent=4,
                   sort_keys=True)
    for n, s in scores.items():
        for fname, doc in s.exports.items():
            write_json(out_dir / safe_name(fname, f"metric '{n}' export file"), _plain(doc), indent=4, sort_keys=True)
    metrics = {}
    for n, s, parent in flat_scores({**scores, **after, **before}):
        m = registry.metrics.get(parent.rsplit("/", 1)[-1] if parent.startswith("attack/") else parent)
        metrics[n] = {**_metric_value(s.value), "better": s.better or getattr(m, "better", None),
                      "version": getattr(m, "version", None), "top_level": parent in top}
        if s.stderr is not None or parent != n:
            metrics[n]["stderr"] = _plain(s.stderr)
        if parent != n:
            metrics[n]["part_of"] = parent
    if attacks:
        identity = {**(identity or {}), "attacks": {o.name: _plain(o.record()) for o in attacks}}
    lm = dict(lm_eval or {})
    run = {"model_name": model_label, "batch_size": settings.get("batch_size"), "limit": settings.get("limit"),
           **lm.pop("run", {})}
    own = {n: v for n, v in metrics.items() if not n.startswith("attack/")}
    write_lm_eval(out_dir, lm_eval_results(task, own, run=run, partial=partial,
                                           n_samples=n_samples_of(scores), **lm))
    # benchmark + report layout make a results tree self-describing: `harness report` needs no task registry
    layout = {"benchmark": task.benchmark}
    if task.report is not None:
        layout["report"] = task.report.to_dict()
    write_json(out_dir / "scores.json", {"task": task.name, "task_version": task.version, "model": model_label,
                                         **(identity or {}), **layout, "partial": partial, "eval": settings,
                                         "metrics": metrics})
