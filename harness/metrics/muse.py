"""MUSE metrics (spec 6.4): knowledge memorization and verbatim memorization as ROUGE-L F1.

- ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE``: greedy answers to the knowmem questions,
  each prompt carrying every row of the matching ``*_qa_icl`` split as in-context examples
  (rendered with the model's template; for Llama-2 ``Question: q\\nAnswer: a\\n\\n...Question: q\\nAnswer: ``),
  max_new_tokens 32, cut at ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"``; prompts truncated to 512
  tokens from the right like the reference's QADataset.
- ``forget_verbmem_ROUGE``: BOS + verbmem prompt, 128 new tokens, scored against the whole ``gt``
  (the reference's CompletionDataset with ``insert_space``; the original MUSE code cut gt to 128 tokens
  and used no stemmer, spec 6.6).

The other MUSE numbers are the shared metrics under their one name each: ``mia_min_k``/``privleak``
and the other attacks (``harness.metrics.mia``) read the privleak forget/holdout texts, and
``extraction_strength``/``exact_memorization`` (``harness.metrics.memorization``) read verbmem,
whenever a task declares the MUSE data roles.
"""

from __future__ import annotations

import numpy as np

from harness import HarnessError, hookimpl
from harness.metrics import Score, metric
from harness.metrics.rouge import rouge_scores

KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_MAX_LENGTH = 512
VERBMEM_MAX_NEW_TOKENS = 128
VERBMEM_MAX_LENGTH = 2048
ROUGE_TYPES = ("rouge1_recall", "rougeL_f1", "rougeL_recall")


def rouge_aggregate(generations: list[dict], rouge_type: str = "rougeL_f1") -> Score:
    """Per-sample ROUGE (``value_by_index`` entries as the reference stores them) and their mean."""
    if rouge_type not in ROUGE_TYPES:
        raise HarnessError(f"rouge_type must be one of {', '.join(ROUGE_TYPES)}, got {rouge_type!r}")
    per = {i: {**rouge_scores(g["ground_truth"], g["generation"]), **g} for i, g in enumerate(generations)}
    value = float(np.mean([p[rouge_type] for p in per.values()])) if per else None
    return Score(value, per_sample=per)


def knowmem_source(ctx, side: str):
    """Generation source for ``side`` in {forget, retain}: the QA split with its ICL split as few-shot."""
    from harness.metrics import Source

    role, icl = f"{side}_knowmem", f"{side}_knowmem_icl"
    for r in (role, icl):
        if r not in ctx.task.data:
            raise HarnessError(f"task '{ctx.task.name}' ({ctx.task.file}): {side}_knowmem_ROUGE needs data role "
                               f"'{r}' (MUSE knowmem/{side}_qa and knowmem/{side}_qa_icl)")
    return Source(role=role, field=ctx.answer_key, prompt=ctx.question_key, kind="qa", fewshot=icl,
                  max_length=KNOWMEM_MAX_LENGTH)


def verbmem_source(ctx):
    """Completion source: prefix = verbmem prompt, target = the whole gt (a space between them)."""
    from harness.metrics import Source

    if "verbmem" not in ctx.task.data:
        raise HarnessError(f"task '{ctx.task.name}' ({ctx.task.file}): forget_verbmem_ROUGE needs data role "
                           "'verbmem' (MUSE verbmem/forget)")
    p = ctx.task.prompt
    return Source(role="verbmem", field=p.get("target", "gt"), prompt=p.get("prefix", "prompt"), kind="text",
                  max_length=VERBMEM_MAX_LENGTH, insert_space=True)


METRICS: list = []


def _knowmem(ctx, side: str, rouge_type: str, max_new_tokens: int, stop) -> Score:
    gens = ctx.generations(knowmem_source(ctx, side), max_new_tokens=max_new_tokens, stop=tuple(stop))
    return rouge_aggregate(gens, rouge_type)


@metric("forget_knowmem_ROUGE", better="lower", into=METRICS)
def forget_knowmem_rouge(ctx, rouge_type: str = "rougeL_f1", max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
                         stop=KNOWMEM_STOP) -> Score:
    """ROUGE-L F1 of few-shot answers to the forget-set knowledge questions (MUSE knowmem)."""
    return _knowmem(ctx, "forget", rouge_type, max_new_tokens, stop)


@metric("retain_knowmem_ROUGE", better="higher", into=METRICS)
def retain_knowmem_rouge(ctx, rouge_type: str = "rougeL_f1", max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
                         stop=KNOWMEM_STOP) -> Score:
    """ROUGE-L F1 of few-shot answers to the retain-set knowledge questions (MUSE knowmem)."""
    return _knowmem(ctx, "retain", rouge_type, max_new_tokens, stop)


@metric("forget_verbmem_ROUGE", better="lower", into=METRICS)
def forget_verbmem_rouge(ctx, rouge_type: str = "rougeL_f1",
                         max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS) -> Score:
    """ROUGE-L F1 of the greedy continuation of forget-set passages against the true continuation."""
    gens = ctx.generations(verbmem_source(ctx), max_new_tokens=max_new_tokens)
    return rouge_aggregate(gens, rouge_type)


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
