"""ROUGE as the reference scores generations (spec 6.1 P5): ``rouge_score`` with the Porter
stemmer, rouge1/rougeL, keeping rouge1 recall, rougeL F1 and rougeL recall per sample."""

from __future__ import annotations

from functools import cache


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(target: str, prediction: str) -> dict[str, float]:
    """The three numbers the reference stores per sample, for one (ground truth, generation)."""
    s = _scorer().score(target=target, prediction=prediction)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure,
            "rougeL_recall": s["rougeL"].recall}


def cut_generation(text: str, stops) -> str:
    """Truncate decoded new tokens at the earliest stop string (sequential splits), then strip."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text.strip()
