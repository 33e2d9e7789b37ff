"""TOFU metrics (spec 6.2, 6.3): answer probability, ROUGE, truth ratio, forget quality, model utility.

The pure functions at the top take per-sample numbers and return exactly what the reference
computes; the registered metrics below read the task's data roles through ``ctx`` (forget_eval =
forgetNN_perturbed, retain_eval = retain_perturbed, real_authors, world_facts) and keep every
per-sample value in the open-unlearning ``value_by_index`` layout.
"""

from __future__ import annotations

import numpy as np

from harness import HarnessError, hookimpl
from harness.metrics import Score, metric

EPS = 1e-10
AGGREGATORS = ("closer_to_1_better", "true_better", "prob_mean")
UTILITY_PARTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                 "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                 "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


# ---------------------------------------------------------------- pure math
def mean_prob(values: list) -> float | None:
    """``probability`` aggregate: mean over samples of the mean over a sample's answers (None skipped)."""
    per = []
    for v in values:
        p = v["prob"] if isinstance(v, dict) else v
        if isinstance(p, list):
            p = [x for x in p if x is not None]
            if p:
                per.append(np.mean(p))
        elif p is not None:
            per.append(p)
    return float(np.mean(per)) if per else None


def probability_w_options(p_correct: list[float], p_wrong: list[list[float]]) -> list[float]:
    """Per sample ``P_c / (P_c + sum_j P_w,j + 1e-10)`` on length-normalised probabilities."""
    return [float(c / (c + np.array(w).sum() + EPS)) for c, w in zip(p_correct, p_wrong)]


def truth_ratios(correct_avg_loss: list[float], wrong_avg_losses: list[list[float]],
                 aggregator: str = "closer_to_1_better") -> list[float]:
    """Per-sample raw truth ratio as the reference stores it.

    ``P_c = exp(-Lbar_c)``, ``P_w = exp(-mean_j Lbar_w,j)`` (geometric mean over the wrong answers);
    ``P_w / (P_c + 1e-10)`` for closer_to_1_better / true_better, ``P_c / (P_c + P_w + 1e-10)`` for
    prob_mean.
    """
    if aggregator not in AGGREGATORS:
        raise HarnessError(f"truth ratio aggregator must be one of {AGGREGATORS}, got {aggregator!r}")
    c = np.exp(-np.array(correct_avg_loss, dtype=np.float64))
    w = np.exp(-np.array(wrong_avg_losses, dtype=np.float64).mean(-1))
    tr = c / (c + w + EPS) if aggregator == "prob_mean" else w / (c + EPS)
    return [float(x) for x in tr]


def truth_ratio_aggregate(trs: list[float], aggregator: str = "closer_to_1_better") -> float:
    """``mean min(TR, 1/(TR+1e-10))`` (forget), ``mean max(0, 1-TR)`` (retain/ra/wf), or ``mean TR``."""
    tr = np.array(trs, dtype=np.float64)
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1 / (tr + EPS))))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0, 1 - tr)))
    if aggregator == "prob_mean":
        return float(np.mean(tr))
    raise HarnessError(f"truth ratio aggregator must be one of {AGGREGATORS}, got {aggregator!r}")


def ks_pvalue(x: list[float], y: list[float]) -> float:
    """Forget quality: two-sided two-sample KS p-value (scipy, method auto = exact at TOFU sizes)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(x, y).pvalue)


def harmonic_mean(values: list[float]) -> float:
    """Model utility: scipy's harmonic mean; any zero part gives 0."""
    from scipy.stats import hmean

    vals = [float(v) for v in values]
    if any(v == 0 for v in vals):
        return 0.0
    return float(hmean(vals))


# ----------------------------------------------------------------- metrics
METRICS: list = []


def _qa(ctx, role: str, field: str, question: str | None = None):
    from harness.metrics import Source

    return Source(role=role, field=field, prompt=question or "question")


def _index(values: list) -> dict:
    return dict(enumerate(values))


def _prob_score(ctx, source) -> Score:
    vals = ctx.probability(source)
    return Score(mean_prob(vals), per_sample=_index(vals))


def _rouge_score(ctx, source, rouge_type: str, max_new_tokens: int, stop=()) -> Score:
    from harness.metrics.rouge import rouge_scores

    gens = ctx.generations(source, max_new_tokens=max_new_tokens, stop=tuple(stop))
    per = []
    for g in gens:
        per.append({**rouge_scores(g["ground_truth"], g["generation"]), **g})
    if rouge_type not in ("rouge1_recall", "rougeL_f1", "rougeL_recall"):
        raise HarnessError(f"rouge_type must be rouge1_recall, rougeL_f1 or rougeL_recall, got {rouge_type!r}")
    value = float(np.mean([p[rouge_type] for p in per])) if per else None
    return Score(value, per_sample=_index(per))


def _tr_score(ctx, correct: str, wrong: str, aggregator: str) -> Score:
    c = ctx.score(correct).per_sample
    w = ctx.score(wrong).per_sample
    idx = [i for i in c if c[i]["avg_loss"] is not None and i in w
           and all(x is not None for x in w[i]["avg_loss"])]
    trs = truth_ratios([c[i]["avg_loss"] for i in idx], [w[i]["avg_loss"] for i in idx], aggregator)
    return Score(truth_ratio_aggregate(trs, aggregator) if trs else None,
                 per_sample={i: {"score": t} for i, t in zip(idx, trs)})


def _wo_score(ctx, correct: str, wrong: str) -> Score:
    c = ctx.score(correct).per_sample
    w = ctx.score(wrong).per_sample
    idx = [i for i in c if c[i]["prob"] is not None and i in w]
    vals = probability_w_options([c[i]["prob"] for i in idx], [w[i]["prob"] for i in idx])
    return Score(float(np.mean(vals)) if vals else None, per_sample={i: {"prob": v} for i, v in zip(idx, vals)})


# forget / retain sets use the task's question (and answer) column names, open-unlearning's
# question_key; real authors and world facts always use "question"/"answer" (spec 6.3)
_PROB = {
    "forget_Q_A_Prob": ("forget_eval", "answer", True, "lower"),
    "forget_Q_A_PARA_Prob": ("forget_eval", "paraphrased_answer", True, "lower"),
    "forget_Q_A_PERT_Prob": ("forget_eval", "perturbed_answer", True, "lower"),
    "retain_Q_A_Prob": ("retain_eval", "answer", True, "higher"),
    "retain_Q_A_PARA_Prob": ("retain_eval", "paraphrased_answer", True, "higher"),
    "retain_Q_A_PERT_Prob": ("retain_eval", "perturbed_answer", True, "lower"),
    "ra_Q_A_Prob": ("real_authors", "answer", False, "higher"),
    "ra_Q_A_PERT_Prob": ("real_authors", "perturbed_answer", False, "lower"),
    "wf_Q_A_Prob": ("world_facts", "answer", False, "higher"),
    "wf_Q_A_PERT_Prob": ("world_facts", "perturbed_answer", False, "lower"),
}
_ROUGE = {
    "forget_Q_A_ROUGE": ("forget_eval", True, "lower"),
    "retain_Q_A_ROUGE": ("retain_eval", True, "higher"),
    "ra_Q_A_ROUGE": ("real_authors", False, "higher"),
    "wf_Q_A_ROUGE": ("world_facts", False, "higher"),
}
_TR = {
    "forget_truth_ratio": ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "closer_to_1_better", "higher"),
    "retain_Truth_Ratio": ("retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "true_better", "higher"),
    "ra_Truth_Ratio": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "true_better", "higher"),
    "wf_Truth_Ratio": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "true_better", "higher"),
}
_WO = {
    "ra_Q_A_Prob_normalised": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob"),
    "wf_Q_A_Prob_normalised": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob"),
}


def _question(ctx, uses_qk: bool) -> str:
    return ctx.question_key if uses_qk else "question"


def _answer(ctx, field: str, uses_qk: bool) -> str:
    return ctx.answer_key if uses_qk and field == "answer" else field


def _make_prob(name, role, field, uses_qk, better):
    def fn(ctx) -> Score:
        return _prob_score(ctx, _qa(ctx, role, _answer(ctx, field, uses_qk), _question(ctx, uses_qk)))

    fn.__doc__ = f"Mean length-normalised probability of {role}.{field} (answer tokens + eos)."
    metric(name, better=better, into=METRICS)(fn)


def _make_rouge(name, role, uses_qk, better):
    def fn(ctx, rouge_type: str = "rougeL_recall", max_new_tokens: int = 200, stop=()) -> Score:
        src = _qa(ctx, role, _answer(ctx, "answer", uses_qk), _question(ctx, uses_qk))
        return _rouge_score(ctx, src, rouge_type, max_new_tokens, stop)

    fn.__doc__ = f"ROUGE-L recall of greedy answers on {role} (max_new_tokens 200)."
    metric(name, better=better, into=METRICS)(fn)


def _make_tr(name, correct, wrong, aggregator, better):
    def fn(ctx, aggregator: str = aggregator) -> Score:
        return _tr_score(ctx, correct, wrong, aggregator)

    fn.__doc__ = f"Truth ratio ({aggregator}) from {correct} and {wrong}."
    metric(name, better=better, into=METRICS)(fn)


def _make_wo(name, correct, wrong):
    def fn(ctx) -> Score:
        return _wo_score(ctx, correct, wrong)

    fn.__doc__ = f"Probability of the right answer among the options ({correct} vs {wrong})."
    metric(name, better="higher", into=METRICS)(fn)


for _n, _a in _PROB.items():
    _make_prob(_n, *_a)
for _n, _a in _ROUGE.items():
    _make_rouge(_n, *_a)
for _n, _a in _TR.items():
    _make_tr(_n, *_a)
for _n, _a in _WO.items():
    _make_wo(_n, *_a)


@metric("forget_quality", better="higher", needs_reference=True, into=METRICS)
def forget_quality(ctx) -> Score:
    """KS-test p-value of per-sample forget truth ratios against the retain model's."""
    mine = ctx.score("forget_truth_ratio").per_sample
    x = [v["score"] for _, v in sorted(mine.items())]
    y = ctx.reference(metric="forget_quality").per_sample("forget_truth_ratio")
    return Score(ks_pvalue(x, y))


@metric("model_utility", better="higher", into=METRICS)
def model_utility(ctx) -> Score:
    """Harmonic mean of the nine retain / real-authors / world-facts numbers (0 if any is 0)."""
    parts = [ctx.score(n).value for n in UTILITY_PARTS]
    if any(p is None for p in parts):
        missing = [n for n, p in zip(UTILITY_PARTS, parts) if p is None]
        raise HarnessError(f"model_utility: parts without a value: {missing}")
    return Score(harmonic_mean(parts))


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
