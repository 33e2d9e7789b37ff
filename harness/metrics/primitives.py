"""Forward-pass primitives shared by every metric (spec 6.1 P1-P3, P5, GradNorm).

One teacher-forced forward pass over a batch yields, per sequence, everything the TOFU/MUSE
metrics read: the answer NLL (P1), the log-prob of each labelled token except the last (P2),
and from the full-vocabulary rows at those positions (P3) the argmax hits (exact memorization,
extraction strength) and the Min-k++ z-scores. ``harness.evaluation.EvalContext`` memoises the
results per (model, data source), so metrics never run their own passes.

Numerics follow the reference: log-softmax and cross-entropy on fp32 logits (transformers 5 no
longer upcasts them), per-sequence averages in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.formatting import IGNORE, collate
from harness.metrics.rouge import cut_generation

MASK_MODES = {"reference": "pad_eq", "corrected": "length"}


@dataclass
class SeqStats:
    """Per-sequence quantities from one forward pass.

    ``avg_loss``/``prob``: P1 over all labelled tokens (answer + eos), None when none is labelled.
    ``lp``: P2, log-probs (targets from input_ids) of the labelled tokens except the final one.
    ``hit``: P3, argmax of the vocabulary row == label, at the same positions.
    ``z``: Min-k++ z-score of each of those tokens, ``(lp - mu) / sigma`` with
    ``mu = sum p log p`` and ``sigma^2 = sum p (log p)^2 - mu^2`` clamped at 1e-6.
    """

    avg_loss: float | None
    prob: float | None
    lp: np.ndarray
    hit: np.ndarray
    z: np.ndarray


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _order(items, sort: bool) -> list[int]:
    idx = list(range(len(items)))
    if sort:
        # longest first: the largest batch allocates first and the rest of the batches pad little
        idx.sort(key=lambda i: -len(items[i]["input_ids"]))
    return idx


def _batches(order: list[int], batch_size: int):
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def _seq_stats(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> SeqStats:
    """Stats of one right-padded sequence from its (T, V) logits."""
    pos = torch.nonzero(labels != IGNORE).flatten()
    n = int(pos.numel())
    empty = np.zeros(0, dtype=np.float32)
    if n == 0:
        return SeqStats(None, None, empty, np.zeros(0, dtype=bool), empty)
    first, last = int(pos[0]), int(pos[-1])
    # rows (first-1 .. last-1) predict tokens first..last; label 0 is never a label in practice,
    # and if it were it has no predicting row (as in the reference's shifted loss)
    lo = max(first - 1, 0)
    rows = logits[lo:last].float().log_softmax(-1)  # fp32, (last-lo, V)
    tgt_lab = labels[lo + 1:last + 1]
    keep = tgt_lab != IGNORE
    nll = -rows[keep].gather(-1, tgt_lab[keep].unsqueeze(-1)).squeeze(-1)
    avg = nll.sum() / n  # n counted on the unshifted labels (P1)
    prob = torch.exp(-avg)
    # P2/P3: labelled positions minus the last one; the contiguous range first..end
    inner = pos[:-1]
    if inner.numel() == 0:
        return SeqStats(float(avg), float(prob), empty, np.zeros(0, dtype=bool), empty)
    start, end = int(inner[0]), int(inner[-1])
    if start == 0:
        start = 1
    r = rows[start - 1 - lo:end - lo]
    tgt = ids[start:end + 1]
    lp = r.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    hit = r.argmax(-1) == labels[start:end + 1]
    p = r.exp()
    mu = (p * r).sum(-1)
    var = ((p * r.square()).sum(-1) - mu.square()).clamp(min=1e-6)
    z = (lp - mu) / var.sqrt()
    return SeqStats(float(avg), float(prob), lp.cpu().numpy().astype(np.float32),
                    hit.cpu().numpy(), z.cpu().numpy().astype(np.float32))


@torch.no_grad()
def forward_stats(model, items: list[dict], pad_id: int, *, batch_size: int = 32,
                  attention_mask: str = "reference", sort: bool = True, progress=None) -> list[SeqStats]:
    """P1-P3 for every item (right padding), returned in the items' order.

    With ``sort`` the items are batched longest first to cut padding; results equal dataset-order
    batching up to float rounding (padding is masked out of every attention row used).
    """
    out: list[SeqStats | None] = [None] * len(items)
    dev = _device(model)
    mask = MASK_MODES[attention_mask]
    for chunk in _batches(_order(items, sort), batch_size):
        batch = collate([items[i] for i in chunk], pad_id, side="right", mask=mask)
        ids = batch["input_ids"].to(dev)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(dev)).logits
        labels = batch["labels"].to(dev)
        for row, i in enumerate(chunk):
            out[i] = _seq_stats(logits[row], ids[row], labels[row])
        if progress is not None:
            progress.update(len(chunk))
    return out  # type: ignore[return-value]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], *, batch_size: int = 32, attention_mask: str = "reference",
             max_new_tokens: int = 200, stop=(), sort: bool = True, progress=None) -> list[dict]:
    """P5: greedy generation from left-padded prompts (pad = eos), in the items' order.

    Each item is a generation item (``input_ids`` = prompt, ``labels`` = the whole conversation
    or the target). Returns ``{"input", "ground_truth", "generation"}`` per item: the ground truth
    is the decoded labels with the decoded prompt removed, stripped; the generation is cut at the
    first eos string or stop string, stripped.
    """
    out: list[dict | None] = [None] * len(items)
    dev = _device(model)
    mask = MASK_MODES[attention_mask]
    eos_id = tokenizer.eos_token_id
    # the reference pads generation batches with the eos id whatever the tokenizer's pad is
    pad_id = eos_id
    stops = [tokenizer.decode([eos_id])] + list(stop)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True,
                      temperature=None, top_p=None, top_k=None)
    if stop:
        gen_kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    for chunk in _batches(_order(items, sort), batch_size):
        batch = collate([items[i] for i in chunk], pad_id, side="left", mask=mask)
        ids = batch["input_ids"].to(dev)
        gen = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(dev), **gen_kwargs)
        new = gen[:, ids.shape[1]:].cpu()
        for row, i in enumerate(chunk):
            it = items[i]
            text_in = decode(tokenizer, it["input_ids"])
            labels = [t for t in it["labels"] if t != IGNORE]
            gt = decode(tokenizer, labels).replace(text_in, "").strip()
            text = cut_generation(decode(tokenizer, new[row].tolist()), stops)
            out[i] = {"input": text_in, "ground_truth": gt, "generation": text}
        if progress is not None:
            progress.update(len(chunk))
    return out  # type: ignore[return-value]


def gradnorms(model, items: list[dict], pad_id: int, *, p: float = 2, attention_mask: str = "reference",
              progress=None) -> list[float | None]:
    """GradNorm attack scores, one sample at a time (the reference's batch size 1).

    loss = -mean of the P2 log-probs; score = mean over parameter tensors of ||grad||_p.
    The model's training flag, requires_grad flags and .grad fields are restored afterwards.
    """
    was_training = model.training
    params = list(model.parameters())
    req = [q.requires_grad for q in params]
    old = [q.grad for q in params]
    out: list[float | None] = []
    dev = _device(model)
    mask = MASK_MODES[attention_mask]
    try:
        model.train()
        for q in params:
            q.requires_grad_(True)
            q.grad = None
        for it in items:
            batch = collate([it], pad_id, side="right", mask=mask)
            ids = batch["input_ids"].to(dev)
            labels = batch["labels"][0].to(dev)
            pos = torch.nonzero(labels != IGNORE).flatten()
            if pos.numel() < 2:
                out.append(None)
            else:
                start, end = max(int(pos[0]), 1), int(pos[-2])
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(dev)).logits[0]
                lp = logits[start - 1:end].float().log_softmax(-1).gather(-1, ids[0, start:end + 1].unsqueeze(-1))
                loss = -lp.mean()
                for q in params:
                    q.grad = None
                loss.backward()
                norms = [torch.linalg.vector_norm(q.grad.float(), ord=p) for q in params if q.grad is not None]
                out.append(float(np.float32(torch.stack(norms).mean().item())))
            if progress is not None:
                progress.update(1)
    finally:
        for q, r, g in zip(params, req, old):
            q.grad = g
            q.requires_grad_(r)
        model.train(was_training)
    return out
