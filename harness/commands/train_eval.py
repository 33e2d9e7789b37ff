"""``harness run --eval-every / --eval-metrics / --keep-best``: which metrics are scored during training, which
way is better, and the scoring callback handed down to the training loop (``harness.training.periodic``),
which can only take a callable from above (training sits below scoring).

- Metrics: ``--eval-metrics``, else the task's ``eval_metrics`` (task YAML; a family's cheap forget-side
  metrics), plus the ``--keep-best`` metric; each with the task's own arguments where it lists them.
- Direction of ``--keep-best METRIC``: the metric's declared ``better`` (lower: min, higher: max, zero: closest
  to 0, one: closest to 1); ``min:METRIC`` / ``max:METRIC`` override it.
- Identity: ``--keep-best`` changes the model that is scored and saved, so the resolved settings (interval,
  metrics, keep-best) enter the run hash then; ``--eval-every`` alone only adds log rows (training is the
  same: the RNG state is kept around scoring), so it is recorded in config.yaml but not hashed, and a
  finished cell is not retrained to add curves (``--overwrite`` does).
"""

from __future__ import annotations

from harness import HarnessError
from harness.options import RunOptions, eval_every_value, items, keep_best_parts
from harness.tasks import Task, suggest

DIRECTION_OF = {"lower": "min", "higher": "max", "zero": "zero", "one": "one"}


def settings(task: Task, choice, opts: RunOptions, reg) -> dict | None:
    """The resolved during-training settings of ``task``'s cells (None without ``--eval-every``), checked
    against the registry before any model work."""
    if opts.eval_every is None:
        return None
    metrics = items("--eval-metrics", opts.eval_metrics) if opts.eval_metrics else list(task.eval_metrics)
    if not metrics:
        raise HarnessError(f"--eval-every: task '{task.name}' ({task.file}) declares no eval_metrics; "
                           "name the metrics to score with --eval-metrics a,b")
    out: dict = {"eval_every": eval_every_value(opts.eval_every), "eval_metrics": metrics}
    if opts.keep_best:
        direction, name = keep_best_parts(opts.keep_best)
        if name not in metrics:
            metrics.append(name)
        out["keep_best"] = {"metric": name, "direction": direction}
    for name in metrics:
        if name not in reg.metrics:
            if "keep_best" in out and name == out["keep_best"]["metric"]:
                where = "--keep-best"
            else:
                where = "--eval-metrics" if opts.eval_metrics else f"task '{task.name}' eval_metrics ({task.file})"
            raise HarnessError(f"{where}: unknown metric '{name}'{suggest(name, reg.metrics)}; "
                               "see `harness ls metrics`")
        if reg.metrics[name].needs_reference and choice.reference is None:
            from harness.scoring.context import missing_reference_error

            raise missing_reference_error(task.name, name)
    best = out.get("keep_best")
    if best is not None and best["direction"] is None:
        declared = reg.metrics[best["metric"]].better
        if declared not in DIRECTION_OF:
            raise HarnessError(f"--keep-best {best['metric']}: the metric declares no direction "
                               f"(better={declared!r}); write min:{best['metric']} or max:{best['metric']}")
        best["direction"] = DIRECTION_OF[declared]
    return out


def evaluator(during: dict | None, task: Task, tokenizer, template, choice, opts: RunOptions, registry):
    """The ``PeriodicEval`` the training loop calls, scoring through ``commands.eval.score_values``."""
    if during is None:
        return None
    from harness.commands.eval import score_values
    from harness.training.periodic import PeriodicEval

    def score(model) -> dict:
        return score_values(task, model, tokenizer, template, choice, opts, during["eval_metrics"],
                            eval_batch_size=opts.eval_batch_size, registry=registry)

    best = during.get("keep_best")
    return PeriodicEval(during["eval_every"], score, (best["metric"], best["direction"]) if best else None)


def best_of(info: dict) -> dict | None:
    """The keep-best record of a finished training (``TrainResult.info``), for scores.json."""
    return (info.get("during_training") or {}).get("keep_best")
