"""Membership-inference attacks and privleak (spec 6.2 "MIA", "privleak").

Each attack scores the forget rows and the holdout rows separately with a loss-like score
(higher = less likely a member); AUC = ``roc_auc_score`` with forget = 0, holdout = 1, so a model
that memorised the forget set has AUC near 1 and one that saw neither near 0.5. privleak compares
the Min-k (k = 0.4) AUC with the reference (retain) model's AUC.

Default data: TOFU forget = ``forget_eval`` (forgetNN_perturbed, answers), holdout = ``holdout``;
MUSE (tasks with ``mia_forget``): the privleak forget / holdout texts as completion items with an
empty prefix, up to 2048 tokens. Both can be overridden with ``forget:``/``holdout:`` sources.
"""

from __future__ import annotations

import zlib

import numpy as np

from harness import HarnessError, hookimpl
from harness.metrics import Score, metric

EPS = 1e-10


# ---------------------------------------------------------------- pure math
def min_k_score(lp, k: float = 0.4) -> float:
    """Min-k%: minus the mean of the ``max(1, int(N*k))`` smallest token log-probs; 0 if N = 0.

    Computed in float32 like the reference (numpy on fp32 log-probs).
    """
    lp = np.asarray(lp, dtype=np.float32)
    if lp.size == 0:
        return 0.0
    n = max(1, int(lp.size * k))
    return float(-np.mean(np.sort(lp)[:n]))


def min_k_plus_plus_score(z, k: float = 0.4) -> float:
    """Min-k++: the same selection on the per-token z-scores ``(lp - mu) / sigma``."""
    return min_k_score(z, k)


def zlib_score(avg_loss: float, text: str) -> float:
    """ZLib: average NLL divided by the zlib-compressed length of the label text (UTF-8)."""
    return avg_loss / len(zlib.compress(text.encode("utf-8")))


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC with labels forget = 0, holdout = 1 on loss-like scores (ties averaged)."""
    from sklearn.metrics import roc_auc_score

    f, h = list(forget_scores), list(holdout_scores)
    if not f or not h:
        raise HarnessError("MIA needs at least one forget and one holdout sample")
    return float(roc_auc_score([0] * len(f) + [1] * len(h), f + h))


def privleak_value(auc: float, ref_auc: float) -> float:
    """``(s - r) / (r + 1e-10) * 100`` with ``s = 1 - AUC``, ``r = 1 - AUC_ref`` (MUSE's convention)."""
    s, r = 1 - auc, 1 - ref_auc
    return (s - r) / (r + EPS) * 100


def _sub(scores: list, float32: bool) -> dict:
    vals = [s for s in scores if s is not None]
    # the reference averages numpy float32 scores for min-k, min-k++ and gradnorm
    agg = (float(np.mean(np.asarray(vals, dtype=np.float32))) if float32 else float(np.mean(vals))) if vals else None
    return {"agg_value": agg, "value_by_index": {i: {"score": s} for i, s in enumerate(scores)}}


def _mia_result(forget: list, holdout: list, float32: bool = False) -> Score:
    auc = mia_auc([s for s in forget if s is not None], [s for s in holdout if s is not None])
    return Score(auc, extra={"forget": _sub(forget, float32), "holdout": _sub(holdout, float32), "auc": auc})


# ----------------------------------------------------------------- metrics
METRICS: list = []


def default_sources(ctx):
    """The (forget, holdout) sources of the task's family."""
    from harness.metrics import Source

    data = ctx.task.data
    if "mia_forget" in data and "mia_holdout" in data:
        text = ctx.task.prompt.get("text", "text")
        return (Source("mia_forget", field=text, prompt=None, kind="text", max_length=2048),
                Source("mia_holdout", field=text, prompt=None, kind="text", max_length=2048))
    if "forget_eval" in data and "holdout" in data:
        return (Source("forget_eval", field=ctx.answer_key, prompt=ctx.question_key),
                Source("holdout", field="answer", prompt="question"))
    raise HarnessError(f"task '{ctx.task.name}': MIA needs data roles forget_eval + holdout (TOFU) or "
                       f"mia_forget + mia_holdout (MUSE), or explicit forget:/holdout: sources")


def _sources(ctx, forget, holdout):
    from harness.metrics import Source

    df, dh = default_sources(ctx) if forget is None or holdout is None else (None, None)
    return (Source.of(forget) if forget is not None else df, Source.of(holdout) if holdout is not None else dh)


@metric("mia_min_k", better="lower", into=METRICS)
def mia_min_k(ctx, k: float = 0.4, forget=None, holdout=None) -> Score:
    """Min-k% attack AUC (k = 0.4), forget vs holdout; 0.5 = retain-like, 1 = memorised."""
    f, h = _sources(ctx, forget, holdout)
    return _mia_result([min_k_score(s.lp, k) for s in ctx.stats(f)],
                       [min_k_score(s.lp, k) for s in ctx.stats(h)], float32=True)


@metric("mia_min_k_plus_plus", better="lower", into=METRICS)
def mia_min_k_plus_plus(ctx, k: float = 0.4, forget=None, holdout=None) -> Score:
    """Min-k++ attack AUC (k = 0.4)."""
    f, h = _sources(ctx, forget, holdout)
    return _mia_result([min_k_plus_plus_score(s.z, k) for s in ctx.stats(f, need="z")],
                       [min_k_plus_plus_score(s.z, k) for s in ctx.stats(h, need="z")], float32=True)


@metric("mia_loss", better="lower", into=METRICS)
def mia_loss(ctx, forget=None, holdout=None) -> Score:
    """LOSS attack AUC (score = mean answer NLL)."""
    f, h = _sources(ctx, forget, holdout)
    return _mia_result([s.avg_loss for s in ctx.stats(f)], [s.avg_loss for s in ctx.stats(h)])


@metric("mia_zlib", better="lower", into=METRICS)
def mia_zlib(ctx, forget=None, holdout=None) -> Score:
    """ZLib attack AUC (mean NLL / zlib length of the label text)."""
    f, h = _sources(ctx, forget, holdout)

    def scores(src):
        return [None if s.avg_loss is None else zlib_score(s.avg_loss, t)
                for s, t in zip(ctx.stats(src), ctx.label_texts(src))]

    return _mia_result(scores(f), scores(h))


@metric("mia_gradnorm", better="lower", into=METRICS)
def mia_gradnorm(ctx, p: float = 2, forget=None, holdout=None) -> Score:
    """GradNorm attack AUC: mean over parameter tensors of the p-norm of the loss gradient."""
    if p in ("inf", "Inf"):
        p = float("inf")
    if p not in (1, 2, float("inf")):
        raise HarnessError(f"mia_gradnorm: p must be 1, 2 or inf, got {p!r}")
    f, h = _sources(ctx, forget, holdout)
    return _mia_result(ctx.gradnorms(f, p=p), ctx.gradnorms(h, p=p), float32=True)


@metric("mia_reference", better="lower", needs_reference=True, into=METRICS)
def mia_reference(ctx, forget=None, holdout=None) -> Score:
    """Reference attack AUC: target mean NLL minus the reference (retain) model's."""
    f, h = _sources(ctx, forget, holdout)

    def scores(src):
        return [None if a.avg_loss is None or b.avg_loss is None else a.avg_loss - b.avg_loss
                for a, b in zip(ctx.stats(src), ctx.stats(src, model="reference"))]

    return _mia_result(scores(f), scores(h))


@metric("privleak", better="zero", needs_reference=True, into=METRICS)
def privleak(ctx, k: float = 0.4, forget=None, holdout=None) -> Score:
    """Min-k AUC relative to the retain model's, in percent; 0 = retain-like."""
    args = {"k": k} if k != 0.4 else {}
    if forget is not None:
        args["forget"] = forget
    if holdout is not None:
        args["holdout"] = holdout
    auc = ctx.score("mia_min_k", **args).value
    ref = ctx.reference(metric="privleak").auc("mia_min_k")
    return Score(privleak_value(auc, ref))


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
