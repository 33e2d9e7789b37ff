"""Tests for the MaxEnt plugin, with the harness's public helpers (harness.testing)."""

import math

import harness_example_method
import torch
import torch.nn.functional as F
from harness_example_method import MaxEnt

from harness.data.encode import collate
from harness.plugins import build_registry
from harness.testing import char_tokenizer, one_step, tiny_llama, toy_data


def _batch(tok):
    forget, retain, _ = toy_data(tok)
    pad = tok.pad_token_id
    return {"forget": collate(forget[:3], pad), "retain": collate(retain[:3], pad)}


def test_registers_through_the_hook_next_to_the_builtins():
    reg = build_registry(extra_plugins=[harness_example_method], entry_points=False, strict=True)
    assert reg.methods["maxent"] is MaxEnt
    assert "grad_diff" in reg.methods  # installed next to the built-ins without a name collision


def test_one_optimizer_step_moves_the_model():
    result = one_step(MaxEnt())
    assert math.isfinite(result.loss) and result.changed
    assert set(result.parts) == {"forget", "retain"}
    vocab = len(char_tokenizer())
    assert -math.log(vocab) <= result.parts["forget"] < 0  # minus an entropy, at most log V
    assert math.isclose(result.loss, result.parts["forget"] + result.parts["retain"], rel_tol=1e-6)


def test_loss_matches_a_token_by_token_computation():
    tok = char_tokenizer()
    model = tiny_llama(tok)
    batch = _batch(tok)
    loss, parts = MaxEnt(gamma=2.0, alpha=0.5).loss(model, batch, None)

    def per_token(part, entropy):
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits.float()
        terms = []
        for b in range(logits.size(0)):
            for t in range(1, logits.size(1)):
                y = int(part["labels"][b, t])
                if y == -100:
                    continue
                logp = F.log_softmax(logits[b, t - 1], dim=-1)
                terms.append(float(-(logp.exp() * logp).sum()) if entropy else -float(logp[y]))
        return sum(terms) / len(terms)

    with torch.no_grad():
        forget = -per_token(batch["forget"], True)
        retain = per_token(batch["retain"], False)
    assert math.isclose(parts["forget"].item(), forget, rel_tol=1e-5)
    assert math.isclose(parts["retain"].item(), retain, rel_tol=1e-5)
    assert math.isclose(loss.item(), 2.0 * forget + 0.5 * retain, rel_tol=1e-5)


def test_forget_term_is_kl_to_uniform_minus_log_vocab():
    tok = char_tokenizer()
    model = tiny_llama(tok)
    batch = _batch(tok)
    _, parts = MaxEnt().loss(model, batch, None)
    f = batch["forget"]
    with torch.no_grad():
        logp = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits.float()[:, :-1]
        logp = logp.log_softmax(-1)[f["labels"][:, 1:] != -100]
        vocab = logp.size(-1)
        kl = (logp.exp() * (logp + math.log(vocab))).sum(-1).mean()
    assert math.isclose(parts["forget"].item(), kl.item() - math.log(vocab), rel_tol=1e-5)


def test_a_step_raises_the_forget_entropy():
    tok = char_tokenizer()
    model = tiny_llama(tok)
    batch = _batch(tok)
    before = MaxEnt().loss(model, batch, None)[1]["forget"].item()
    after = MaxEnt().loss(one_step(MaxEnt(alpha=0.0), tiny_llama(tok), tok, lr=1e-2).model, batch, None)[1]
    assert after["forget"].item() < before  # -entropy went down: the predictions moved towards uniform
