"""Forward-pass primitives shared by every metric (spec 6.1 P1-P3, P5, GradNorm).

One teacher-forced forward pass over a batch yields, per sequence, everything the TOFU/MUSE
metrics read: the answer NLL (P1), the log-prob of each labelled token except the last (P2),
and from the full-vocabulary rows at those positions (P3) the argmax hits (exact memorization,
extraction strength) and the Min-k++ z-scores. ``harness.scoring.evaluate.EvalContext`` memoises the
results per (model, data source), so metrics never run their own passes.

Numerics follow the reference: log-softmax and cross-entropy on fp32 logits (transformers 5 no
longer upcasts them), per-sequence averages in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.data.encode import IGNORE, collate
from harness.metrics.rouge import cut_generation
from harness.options import EVAL_BATCH_SIZE
from harness.scoring.greedy import accepts as _accepts
from harness.scoring.greedy import cache_kw as _cache_kw


@dataclass
class SeqStats:
    """Per-sequence quantities from one forward pass.

    ``avg_loss``/``prob``: P1 over all labelled tokens (answer + eos), None when none is labelled.
    ``lp``: P2, log-probs (targets from input_ids) of the labelled tokens except the final one.
    ``hit``: P3, argmax of the vocabulary row == label, at the same positions.
    ``z``: Min-k++ z-score of each of those tokens, ``(lp - mu) / sigma`` with
    ``mu = sum p log p`` and ``sigma^2 = sum p (log p)^2 - mu^2`` clamped at 1e-6.
    Fields beyond the ``need`` they were computed for (``NEEDS``) are None.
    """

    avg_loss: float | None
    prob: float | None
    lp: np.ndarray | None
    hit: np.ndarray | None
    z: np.ndarray | None


# what a pass computes from the vocabulary rows, cheapest first: "prob" the P1 loss only (probability
# metrics, truth ratios: the option sets), "tokens" also lp and hit (Min-k, exact memorization,
# extraction strength), "z" also the Min-k++ z-scores (an exp and two more sums over the vocabulary)
NEEDS = ("prob", "tokens", "z")


def _device(model) -> torch.device:
    return next(model.parameters()).device


# causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)`` (no soft-capping or
# logit scale): for them the head runs on the labelled rows only (the same values row by row)
PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3")


def _split_head(model):
    """(decoder, lm head) of a plain causal LM, else None (the model's own forward is used)."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD or not type(model).__name__.endswith("ForCausalLM"):
        return None
    try:
        return model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _first_label(labels: torch.Tensor) -> int:
    """Smallest first labelled position of a right-padded batch (0 when a row has none)."""
    valid = labels != IGNORE
    return int(valid.float().argmax(1).min()) if bool(valid.any(1).all()) else 0


def _order(items, sort: bool) -> list[int]:
    idx = list(range(len(items)))
    if sort:
        # longest first: the largest batch allocates first and the rest of the batches pad little
        idx.sort(key=lambda i: -len(items[i]["input_ids"]))
    return idx


# attention cells (rows x positions^2) per batch: a batch of long rows is cut so the (B, H, T, T)
# scores of the attention kernel stay bounded (batch 32 of 2049-token MUSE rows needs ~1 GB for
# them on the tiny model; short TOFU rows never reach the bound, their batches are unchanged)
ATTENTION_CELLS = 2 ** 24


def _batches(order: list[int], batch_size: int, lengths: list[int] | None = None, budget: int | None = None,
             square: list[int] | None = None):
    """Consecutive batches of ``order``: ``batch_size`` rows, or with ``budget`` as many rows as fit in
    ``budget`` positions (at least ``batch_size``), cut so rows x positions^2 stays under ATTENTION_CELLS.
    ``square``: the positions that attend to each other all at once when they differ from ``lengths``
    (a generation's prompt: its new tokens attend one at a time)."""
    square = square if square is not None else lengths
    cur: list[int] = []
    width = sq = 0
    for i in order:
        w = max(width, lengths[i]) if lengths is not None else 0
        q = max(sq, square[i]) if square is not None else 0
        cap = max(batch_size, budget // max(w, 1)) if budget else batch_size
        if cur and (len(cur) >= cap or (len(cur) + 1) * q * q > ATTENTION_CELLS):
            yield cur
            cur = []
            w, q = (lengths[i], square[i]) if lengths is not None else (0, 0)
        cur.append(i)
        width, sq = w, q
    if cur:
        yield cur


# vocabulary cells (rows x V) per block of the lm head and log-softmax: on CPU a block that stays in cache
# between the head's matmul and the log-softmax reading it (head + log-softmax + gather of 2048 rows of the
# tiny model's 4096 words: 57-61 ms in one block, 36-41 ms in blocks of 512 rows, the same values); on a GPU
# blocks large enough to keep the kernels busy, still bounded for 128k-word vocabularies
ROW_CELLS = {"cpu": 2 ** 21, "cuda": 2 ** 26}


def _row_chunk(vocab: int, device: torch.device) -> int:
    return max(16, ROW_CELLS.get(device.type, ROW_CELLS["cuda"]) // max(vocab, 1))


def batch_stats(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, *, need: str = "z",
                logprobs: bool = False, head=None) -> list[SeqStats]:
    """Stats of each right-padded sequence from the batch's (B, T, V) logits.

    Row t predicts token t+1. P1 uses the rows whose next label is not -100, summed and divided
    by the number of labels (counted on the unshifted labels). P2/P3 use the rows start-1..end-1
    where start/end are the first/last labelled positions once the final label is dropped.
    Only those rows go through the fp32 log-softmax, in blocks of ``_row_chunk`` rows; ``need`` (``NEEDS``)
    says which fields are computed (the rest are None); ``logprobs``: ``logits`` are already the
    fp32 log-softmax (the same values row by row: the kernel works per row). With ``head`` (the lm
    head), ``logits`` are the final hidden states and only the rows read go through the head.
    """
    level = NEEDS.index(need)
    B, T = ids.shape
    dev = ids.device
    valid = labels != IGNORE
    n = valid.sum(1)
    ar = torch.arange(T, device=dev)
    last = torch.where(valid, ar, -1).max(1).values                       # -1: no label
    inner = valid & (ar[None, :] != last[:, None])                         # labels minus the last one
    start = torch.where(inner, ar, T).min(1).values.clamp(min=1)
    end = torch.where(inner, ar, -1).max(1).values
    rows = ar[None, :-1]
    p1 = labels[:, 1:] != IGNORE                                           # (B, T-1)
    p2 = (rows >= start[:, None] - 1) & (rows <= end[:, None] - 1)
    need_rows = p1 | p2 if level else p1                                   # p2-only rows add 0.0 to a sum
    sel = logits[:, :-1][need_rows]                      # (N, V) rows, or (N, hidden) with ``head``; row-major (b, t)
    vocab = (getattr(head, "out_features", None) or head.weight.shape[0]) if head is not None else sel.shape[-1]
    chunk = _row_chunk(vocab, dev)
    lab_next = labels[:, 1:][need_rows]
    id_next = ids[:, 1:][need_rows]
    is_p1, is_p2 = p1[need_rows], p2[need_rows]
    N = sel.shape[0]
    nll = torch.zeros(N, device=dev)
    if level:
        lp = torch.empty(N, device=dev)
        hit = torch.empty(N, dtype=torch.bool, device=dev)
    if level > 1:
        z = torch.empty(N, device=dev)
    for a in range(0, N, chunk):
        b = a + chunk
        x = sel[a:b] if head is None else head(sel[a:b])
        r = x if logprobs else x.float().log_softmax(-1)
        ln = lab_next[a:b]
        nll[a:b] = torch.where(is_p1[a:b], -r.gather(-1, ln.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        if not level:
            continue
        t = r.gather(-1, id_next[a:b].unsqueeze(-1)).squeeze(-1)
        lp[a:b] = t
        hit[a:b] = r.argmax(-1) == ln
        if level > 1:
            pr = r.exp()
            mu = (pr * r).sum(-1)
            var = ((pr * r.square()).sum(-1) - mu.square()).clamp(min=1e-6)
            z[a:b] = (t - mu) / var.sqrt()
    owner = torch.arange(B, device=dev)[:, None].expand(B, T - 1)[need_rows]
    nll_sum = torch.zeros(B, device=dev).index_add_(0, owner, nll)
    avg = nll_sum / n.clamp(min=1)
    prob = torch.exp(-avg)
    avg_l, prob_l, n_l = avg.tolist(), prob.tolist(), n.tolist()
    none = [None] * B
    lp2 = hit2 = z2 = none
    if level:
        cuts = np.cumsum(p2.sum(1).tolist())[:-1]
        lp2 = np.split(lp[is_p2].cpu().numpy().astype(np.float32), cuts)
        hit2 = np.split(hit[is_p2].cpu().numpy(), cuts)
        if level > 1:
            z2 = np.split(z[is_p2].cpu().numpy().astype(np.float32), cuts)
    return [SeqStats(avg_l[i] if n_l[i] else None, prob_l[i] if n_l[i] else None, lp2[i], hit2[i], z2[i])
            for i in range(B)]


def _seq_stats(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> SeqStats:
    """Stats of one sequence from its (T, V) logits."""
    return batch_stats(logits[None], ids[None], labels[None])[0]


def _slot_batches(groups: list[list[int]], batch_size: int):
    """The reference's batches of an option set (spec 6.1 P4): ``batch_size`` rows in dataset order,
    one padded mini-batch per answer slot."""
    for a in range(0, len(groups), batch_size):
        block = groups[a:a + batch_size]
        for j in range(max(len(g) for g in block)):
            yield [g[j] for g in block if j < len(g)]


@torch.no_grad()
def forward_stats(model, items: list[dict], pad_id: int, *, batch_size: int = EVAL_BATCH_SIZE,
                  attention_mask: str = "reference", sort: bool = True, progress=None, need: str = "z",
                  naive: bool = False, slots: list[list[int]] | None = None) -> list[SeqStats]:
    """P1-P3 for every item (right padding), returned in the items' order.

    With ``sort`` the items are batched longest first to cut padding; results equal dataset-order
    batching up to float rounding (padding is masked out of every attention row used). ``need``:
    which fields (``NEEDS``). ``naive`` pays what the reference evaluator pays per pass (the speed
    benchmark's baseline): the lm head at every position and one fp32 log-softmax over the whole
    (B, T, V) logits, then the same stats; with ``slots`` (the option groups of a list column)
    dataset-order rows are batched one answer slot at a time, as the reference does.
    """
    out: list[SeqStats | None] = [None] * len(items)
    dev = _device(model)
    mask = attention_mask
    keep = _accepts(model, "logits_to_keep") and not naive
    split = None if naive else _split_head(model)
    lengths = [len(it["input_ids"]) for it in items]
    if naive and slots is not None and not sort:
        batches = _slot_batches(slots, batch_size)
    else:
        batches = _batches(_order(items, sort), batch_size, lengths)
    for chunk in batches:
        batch = collate([items[i] for i in chunk], pad_id, side="right", mask=mask)
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        # rows before the first label's predecessor are never read: the lm head skips them
        # (row t of the kept tail still predicts token t+1 of the kept ids, so the stats are unchanged)
        am = batch["attention_mask"].to(dev)
        if split is not None:  # the head on exactly the rows read
            hidden = split[0](input_ids=ids, attention_mask=am).last_hidden_state
            stats = batch_stats(hidden, ids, labels, need=need, head=split[1])
        else:
            off = max(0, _first_label(labels) - 1) if keep else 0
            kw = {"logits_to_keep": ids.shape[1] - off} if off else {}
            logits = model(input_ids=ids, attention_mask=am, **kw).logits
            if naive:
                logits = logits.float().log_softmax(-1)
            stats = batch_stats(logits, ids[:, off:], labels[:, off:], need=need, logprobs=naive)
        for i, st in zip(chunk, stats):
            out[i] = st
        if progress is not None:
            progress.update(len(chunk))
    return out  # type: ignore[return-value]


def shared_prefix_length(group: list[dict]) -> int:
    """Tokens every item of ``group`` starts with that no labelled position needs as a logits row.

    The common prefix of the items' ids, cut so the row predicting each item's first label (and
    the token after the prefix) stays in the suffix pass; 0 when nothing can be shared.
    """
    ids = [it["input_ids"] for it in group]
    n = min(len(x) for x in ids)
    lcp = 0
    while lcp < n and all(x[lcp] == ids[0][lcp] for x in ids[1:]):
        lcp += 1
    first = min(next((j for j, t in enumerate(it["labels"]) if t != IGNORE), len(it["labels"])) for it in group)
    return max(0, min(lcp, first - 1, n - 1))


@torch.no_grad()
def forward_stats_shared(model, items: list[dict], groups: list[list[int]], pad_id: int, *,
                         batch_size: int = EVAL_BATCH_SIZE, attention_mask: str = "reference",
                         sort: bool = True, progress=None, need: str = "z") -> list[SeqStats]:
    """``forward_stats`` for option sets: the items of each group (one question's answers) share
    their prompt, whose KV cache is computed once and reused for every answer.

    A batch holds the groups of about ``batch_size`` items: one pass over their right-padded
    prefixes (``use_cache``), the cache repeated per answer (``DynamicCache.reorder_cache``), one
    pass over the right-padded suffixes with explicit ``position_ids`` (a prefix's padding is
    masked out, so every answer sees the positions and keys of its full pass). Equal to
    ``forward_stats`` up to float rounding.
    """
    from transformers import DynamicCache

    out: list[SeqStats | None] = [None] * len(items)
    dev = _device(model)
    groups = [g for g in groups if g]
    plens = [shared_prefix_length([items[i] for i in g]) for g in groups]
    order = list(range(len(groups)))
    if sort:
        order.sort(key=lambda g: -max(len(items[i]["input_ids"]) for i in groups[g]))
    batches, cur, size = [], [], 0
    for g in order:
        if cur and size + len(groups[g]) > batch_size:
            batches.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += len(groups[g])
    if cur:
        batches.append(cur)
    for bg in batches:
        flat = [groups[g] for g in bg if plens[g] == 0]
        if flat:  # nothing to share (one-token prompts): the plain pass
            idx = [i for f in flat for i in f]
            for i, st in zip(idx, forward_stats(model, [items[i] for i in idx], pad_id, batch_size=len(idx),
                                                attention_mask=attention_mask, sort=False, need=need)):
                out[i] = st
        bg = [g for g in bg if plens[g] > 0]
        if not bg:
            continue
        pre = collate([{"input_ids": items[groups[g][0]]["input_ids"][:plens[g]],
                        "labels": [IGNORE] * plens[g]} for g in bg], pad_id, side="right", mask=attention_mask)
        cache = DynamicCache()
        ckw = _cache_kw(model)
        extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        model(input_ids=pre["input_ids"].to(dev), attention_mask=pre["attention_mask"].to(dev),
              use_cache=True, **{ckw: cache}, **extra)
        owner = [k for k, g in enumerate(bg) for _ in groups[g]]
        idx = [i for g in bg for i in groups[g]]
        cache.reorder_cache(torch.tensor(owner, device=dev))
        suf = collate([{"input_ids": items[i]["input_ids"][plens[g]:], "labels": items[i]["labels"][plens[g]:]}
                       for g in bg for i in groups[g]], pad_id, side="right", mask=attention_mask)
        S = suf["input_ids"].shape[1]
        start = torch.tensor([plens[bg[k]] for k in owner])
        pos = (start[:, None] + torch.arange(S)[None, :]).to(dev)
        mask = torch.cat([pre["attention_mask"][owner], suf["attention_mask"]], 1).to(dev)
        ids = suf["input_ids"].to(dev)
        split = _split_head(model)
        if split is not None:
            hidden = split[0](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                              **{ckw: cache}).last_hidden_state
            stats = batch_stats(hidden, ids, suf["labels"].to(dev), need=need, head=split[1])
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{ckw: cache}).logits
            stats = batch_stats(logits, ids, suf["labels"].to(dev), need=need)
        for i, st in zip(idx, stats):
            out[i] = st
        if progress is not None:
            progress.update(len(idx))
    return out  # type: ignore[return-value]


def clean_up_tokenization(text: str) -> str:
    """The space clean-up that transformers 4.x applied on ``decode(clean_up_tokenization_spaces=True)``
    for every fast tokenizer (the published numbers were decoded that way); transformers 5 skips
    it for BPE tokenizers, so it is applied here explicitly."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode(tokenizer, ids, *, clean_up: bool = True) -> str:
    """``decode(skip_special_tokens=True)`` plus, by default, the transformers-4 space clean-up."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return clean_up_tokenization(text) if clean_up else text


def _kv_budget(model, positions: int) -> int:
    """Positions of KV cache taking the memory of ``positions`` rows of fp32 logits: x V / (2 layers
    x kv heads x head dim), at least ``positions`` (tiny Llama: x8; Llama-3.2-1B: x7.8; Llama-2-7B: x1)."""
    try:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return int(positions * max(1.0, cfg.vocab_size / (2 * cfg.num_hidden_layers * kv * hd)))
    except (AttributeError, TypeError, ZeroDivisionError):
        return positions


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], *, batch_size: int = EVAL_BATCH_SIZE, attention_mask: str = "reference",
             max_new_tokens: int = 200, stop=(), sort: bool = True, progress=None,
             counts: dict | None = None, drop_finished: bool = True, budget: int | None = None) -> list[dict]:
    """P5: greedy generation from left-padded prompts (pad = eos), in the items' order.

    Each item is a generation item (``input_ids`` = prompt, ``labels`` = the whole conversation
    or the target). Returns ``{"input", "ground_truth", "generation"}`` per item: the ground truth
    is the decoded labels with the decoded prompt removed, stripped; the generation is cut at the
    first eos string or stop string, stripped.

    ``drop_finished`` (and a model whose generation config is plain greedy search): finished rows
    leave the batch (``greedy_dropping``); otherwise ``model.generate``, which pays every row until
    the whole batch has finished. Same generations (test: tests/test_generation_speed.py).
    ``budget`` (positions of a full-length teacher-forced batch): a generation batch holds as many rows
    (prompt + new tokens) as keep its KV cache within that batch's fp32 logits (``_kv_budget``), at
    least ``batch_size``: decoding steps cost mostly a fixed overhead per call on small models.
    """
    out: list[dict | None] = [None] * len(items)
    dev = _device(model)
    mask = attention_mask
    eos_id = tokenizer.eos_token_id
    # the reference pads generation batches with the eos id whatever the tokenizer's pad is
    pad_id = eos_id
    stops = [tokenizer.decode([eos_id])] + list(stop)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True,
                      temperature=None, top_p=None, top_k=None)
    if stop:
        gen_kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    from harness.scoring.greedy import greedy_dropping, plain_greedy

    fast = drop_finished and plain_greedy(model)
    prompts = [len(it["input_ids"]) for it in items]
    lengths = [n + max_new_tokens for n in prompts]
    budget = _kv_budget(model, budget) if budget else None
    for chunk in _batches(_order(items, sort), batch_size, lengths, budget, square=prompts if budget else None):
        batch = collate([items[i] for i in chunk], pad_id, side="left", mask=mask)
        ids = batch["input_ids"].to(dev)
        if fast:
            new = greedy_dropping(model, tokenizer, ids, batch["attention_mask"].to(dev),
                                  max_new_tokens=max_new_tokens, stop=tuple(stop), counts=counts)
        else:
            gen = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(dev), **gen_kwargs)
            new = gen[:, ids.shape[1]:].cpu().tolist()
            if counts is not None:  # decoding steps paid for, finished rows included (the benchmark's count)
                counts["new_tokens"] = counts.get("new_tokens", 0) + sum(len(x) for x in new)
        for row, i in enumerate(chunk):
            it = items[i]
            text_in = decode(tokenizer, it["input_ids"])
            labels = [t for t in it["labels"] if t != IGNORE]
            gt = decode(tokenizer, labels).replace(text_in, "").strip()
            text = cut_generation(decode(tokenizer, new[row]), stops)
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
    mask = attention_mask
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
