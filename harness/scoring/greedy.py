"""Greedy decoding in which finished rows leave the batch (spec 6.1 P5, ``primitives.generate``).

Plain ``model.generate`` keeps paying every row of a batch until its last row has finished; the
loop here drops a row and its KV cache as soon as it has emitted eos or a stop string, with the
same steps as ``generate``'s greedy search, so the generations are the same (tested against
``generate`` on every generation source of a TOFU and a MUSE task).
"""

from __future__ import annotations

import torch


def accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kw(model) -> str:
    # transformers 5.2x renamed past_key_values to cache
    return "cache" if accepts(model, "cache") else "past_key_values"


# generation-config fields that add a logits processor or a stopping rule to greedy decoding; the
# row-dropping loop reproduces plain greedy search only, so any of these set means model.generate
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
               "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
               "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty",
               "renormalize_logits", "max_time", "stop_strings", "num_beams")
_NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "num_beams": 1, "min_length": 0,
            "min_new_tokens": 0, "no_repeat_ngram_size": 0, "renormalize_logits": False}


def plain_greedy(model) -> bool:
    """Whether greedy search of ``model`` is argmax decoding and nothing else (no logits processor)."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None or not accepts(model, "position_ids") or getattr(model.config, "is_encoder_decoder", False):
        return False
    return all(getattr(cfg, k, None) in (None, _NEUTRAL.get(k), [], ()) for k in _PROCESSORS)


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return set(ids) or {tokenizer.eos_token_id}


@torch.no_grad()
def greedy_dropping(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int,
                    stop=(), counts: dict | None = None) -> list[list[int]]:
    """Greedy decoding of a left-padded batch in which a row leaves the batch (and its KV cache,
    ``DynamicCache.batch_select_indices``) as soon as it has emitted an eos id or its decoded new
    tokens contain a stop string; the others go on. The new tokens of each row, eos included.

    The steps mirror ``generate``'s greedy search: position ids from the attention mask, lm head on
    the last position only, argmax of the fp32 logits, attention mask grown by one per step.
    """
    from transformers import DynamicCache

    dev = ids.device
    eos = eos_ids(model, tokenizer)
    ckw = cache_kw(model)
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache()
    keep_kw = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{ckw: cache},
                   **keep_kw).logits
    B = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))                      # batch row -> item row
    last = pos[:, -1]
    paid = 0
    for step in range(max_new_tokens):
        nxt = logits[:, -1].to(dtype=torch.float32).argmax(-1)
        paid += len(rows)
        done = []
        for j, (r, t) in enumerate(zip(rows, nxt.tolist())):
            out[r].append(t)
            if t in eos or (stop and any(x in tokenizer.decode(out[r], skip_special_tokens=True) for x in stop)):
                done.append(j)
        if step == max_new_tokens - 1:
            break
        if done:
            finished = set(done)
            live = [j for j in range(len(rows)) if j not in finished]
            if not live:
                break
            sel = torch.tensor(live, device=dev)
            cache.batch_select_indices(sel)
            rows = [rows[j] for j in live]
            nxt, mask, last = nxt[sel], mask[sel], last[sel]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        last = last + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                       **{ckw: cache}, **keep_kw).logits
    if counts is not None:
        counts["new_tokens"] = counts.get("new_tokens", 0) + paid
    return out


