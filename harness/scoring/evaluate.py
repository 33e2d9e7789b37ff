"""Scoring a model on a task: ``evaluate_task`` runs the task's metric suite through one
``EvalContext`` and writes the result files."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import HarnessError, __version__
from harness.attacks import AttackInput
from harness.metrics import Score
from harness.options import EVAL_BATCH_SIZE
from harness.scoring.attacked import flat_scores as attack_scores
from harness.scoring.attacked import run_attacks, score_in_eval_mode
from harness.scoring.context import EvalContext, missing_reference_error
from harness.scoring.export import write_outputs
from harness.scoring.reference import resolve_reference
from harness.scoring.shard import is_writer, wait


def score_rows(scores: dict[str, Score], registry, top: list[str]) -> list[tuple[str, Any, str]]:
    """Table rows: top-level metrics first (task order), then their dependencies."""
    from harness.metrics import flat_scores

    flat = flat_scores(scores)
    order = sorted((r for r in flat if r[2] in top), key=lambda r: top.index(r[2])) + [r for r in flat if r[2] not in top]
    # attack/<name>/[before/]<metric> reads in the direction of <metric>
    return [(n, s.value, s.better or getattr(registry.metrics.get(parent.rsplit("/", 1)[-1]), "better", ""))
            for n, s, parent in order]


def evaluate_task(task, model, tokenizer, template, *, reference=None, out_dir=None, batch_size: int = EVAL_BATCH_SIZE,
                  limit: int | None = None, metrics=None, progress: bool = True,
                  attention_mask: str = "reference", registry=None, data_dir=None,
                  model_label: str | None = None, share: bool = True,
                  sort: bool = True, reference_options: dict | None = None,
                  max_length: int | None = None, identity: dict | None = None,
                  lm_eval_run: dict | None = None, timings: list | None = None,
                  shared_prefix: bool = True, attacks=(), attack_seed: int = 0,
                  training: dict | None = None) -> dict[str, Score]:
    """Score ``model`` on ``task``'s metric suite (or ``metrics``: names or (name, args) pairs).

    ``reference``: a retain model directory / hub id, an ``*_EVAL.json`` or ``*_SUMMARY.json`` log,
    or a ``harness.scoring.reference.Reference``; needed only by metrics that declare ``needs_reference``.
    Returns every computed Score by name (dependencies included); with ``out_dir`` writes the
    result files, ``scores.json`` last. ``share=False`` / ``sort=False`` switch off pass sharing and
    length-sorted batching (only for measuring what they save; the numbers stay the same).
    ``lm_eval_run``: what the lm-eval results file records of the run (``model_args``, ``git_hash``, ...).
    ``shared_prefix=False``: every answer of an option set gets its own full pass (no reused question
    KV cache; equal up to float rounding). ``timings``: a list that receives one entry per primitive
    computed (the speed benchmark's breakdown).
    ``attacks``: ``harness.attacks.Attack`` instances; each attacks a copy of ``model`` (seeded by
    ``attack_seed``; ``training``: the run's training defaults) and the task's ``attack:`` metrics are scored
    again, returned and written as ``attack/<name>/<metric>`` (docs/attacks.md).
    """
    t0 = time.perf_counter()
    wall0 = time.time()

    def make_ctx(m, subset=None, label="target"):
        return EvalContext(task, m, tokenizer, template, reference=reference, batch_size=batch_size,
                           attention_mask=attention_mask, limit=limit, progress=progress, registry=registry,
                           data_dir=data_dir, share=share, sort=sort, reference_options=reference_options,
                           max_length=max_length, resolve_reference=resolve_reference, subset=subset, label=label,
                           timings=timings, shared_prefix=shared_prefix)

    ctx = make_ctx(model)
    wanted = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in (metrics or task.metrics)]
    reg = ctx.registry
    for name, _ in wanted:
        if name not in reg.metrics:
            from harness.tasks import suggest

            raise HarnessError(f"task '{task.name}': unknown metric '{name}'{suggest(name, reg.metrics)}; "
                               "see `harness ls metrics`")
        if reg.metrics[name].needs_reference and reference is None:
            raise missing_reference_error(task.name, name)
    score_in_eval_mode(ctx, wanted)
    top = [n for n, _ in wanted]
    outcomes = []
    if attacks:
        inp = AttackInput(model, tokenizer, task, template, attack_seed, dict(training or {}), data_dir, limit,
                          attention_mask, max_length)
        outcomes = run_attacks(list(attacks), model, ctx.scores, make_ctx, inp)
    if out_dir is not None and is_writer():  # rank 0 of a multi-process job: every rank holds the same scores
        settings = {"batch_size": batch_size, "attention_mask": attention_mask, "limit": limit,
                    "harness_version": __version__, "template": template_dict(template),
                    "reference": ctx._reference.describe() if ctx._reference is not None else None,
                    "seconds": round(time.perf_counter() - t0, 1)}
        write_outputs(Path(out_dir), task, ctx.scores, reg, top, model_label=model_label or "model",
                      partial=bool(limit), settings=settings, identity=identity,
                      lm_eval={"run": {"max_length": max_length, **(lm_eval_run or {})}, "tokenizer": tokenizer,
                               "started": t0, "start_wall": wall0}, attacks=outcomes)
    if out_dir is not None:
        wait()  # no rank reads the result files before they exist
    return {**ctx.scores, **attack_scores(outcomes)}


def template_dict(template) -> dict | None:
    if template is None:
        return None
    try:
        return asdict(template)
    except TypeError:
        return dict(vars(template))
