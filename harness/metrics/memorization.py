"""Exact memorization and extraction strength (spec 6.2), from teacher-forced argmax predictions.

Both look at the labelled tokens except the final one (the eos prediction is ignored, P3).
Default data: TOFU ``forget_eval`` answers; MUSE (tasks with ``verbmem``): prompt + " " + gt
completion items with labels on gt (up to 2048 tokens). Override with ``source:``.
"""

from __future__ import annotations

import numpy as np

from harness import hookimpl
from harness.metrics import Score, metric


# ---------------------------------------------------------------- pure math
def exact_memorization_score(hit) -> float | None:
    """Fraction of positions whose argmax equals the label; None when there are none."""
    hit = np.asarray(hit, dtype=bool)
    return None if hit.size == 0 else float(hit.sum() / hit.size)


def extraction_strength_score(hit) -> float:
    """``1 - k/N`` for the smallest k whose suffix ``[k:]`` is predicted exactly.

    Reproduces the reference's loop: when no suffix matches, k ends at N-1, so the floor is 1/N
    (not 0); N = 0 gives 0.
    """
    hit = np.asarray(hit, dtype=bool)
    n = hit.size
    if n == 0:
        return 0.0
    k = n - 1
    # suffix_ok[j] = all(hit[j:])
    suffix_ok = np.flip(np.cumprod(np.flip(hit))).astype(bool)
    matches = np.nonzero(suffix_ok)[0]
    if matches.size:
        k = min(int(matches[0]), n - 1)
    return 1 - k / n


# ----------------------------------------------------------------- metrics
METRICS: list = []


def default_source(ctx):
    from harness.metrics import Source

    if "verbmem" in ctx.task.data and "forget_eval" not in ctx.task.data:
        p = ctx.task.prompt
        return Source("verbmem", field=p.get("target", "gt"), prompt=p.get("prefix", "prompt"), kind="text",
                      max_length=2048, insert_space=True)
    return Source("forget_eval", field=ctx.answer_key, prompt=ctx.question_key)


def _stats(ctx, source):
    from harness.metrics import Source

    return ctx.stats(Source.of(source) if source is not None else default_source(ctx))


@metric("exact_memorization", better="lower", into=METRICS)
def exact_memorization(ctx, source=None) -> Score:
    """Mean fraction of answer tokens the model predicts exactly (teacher forcing)."""
    per = {i: {"score": exact_memorization_score(s.hit)} for i, s in enumerate(_stats(ctx, source))}
    vals = [v["score"] for v in per.values() if v["score"] is not None]
    return Score(float(np.mean(vals)) if vals else None, per_sample=per)


@metric("extraction_strength", better="lower", into=METRICS)
def extraction_strength(ctx, source=None) -> Score:
    """Mean extraction strength: the longest exactly-predicted answer suffix, as a fraction."""
    per = {i: {"score": extraction_strength_score(s.hit)} for i, s in enumerate(_stats(ctx, source))}
    return Score(float(np.mean([v["score"] for v in per.values()])) if per else None, per_sample=per)


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
