"""Tests for the WGA plugin, with the harness's public helpers (harness.testing)."""

import math

import harness_example_method
import torch
import torch.nn.functional as F
from harness_example_method import WGA

from harness.data.encode import collate
from harness.plugins import build_registry
from harness.testing import char_tokenizer, one_step, tiny_llama, toy_data


def _batch(tok):
    forget, retain, _ = toy_data(tok)
    pad = tok.pad_token_id
    return {"forget": collate(forget[:3], pad), "retain": collate(retain[:3], pad)}


def test_registers_through_the_hook():
    reg = build_registry(extra_plugins=[harness_example_method], entry_points=False, strict=True)
    assert reg.methods["wga"] is WGA


def test_one_optimizer_step_moves_the_model():
    result = one_step(WGA())
    assert math.isfinite(result.loss) and result.changed
    assert set(result.parts) == {"forget", "retain"}
    assert result.parts["forget"] < 0  # gradient ascent: the forget term is minus a weighted NLL
    assert math.isclose(result.loss, result.parts["forget"] + result.parts["retain"], rel_tol=1e-6)


def test_loss_matches_a_token_by_token_computation():
    tok = char_tokenizer()
    model = tiny_llama(tok)
    batch = _batch(tok)
    method = WGA(beta=0.7, gamma=2.0, alpha=0.5)
    loss, parts = method.loss(model, batch, None)

    def manual(part, weighted):
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits.float()
        terms = []
        for b in range(logits.size(0)):
            for t in range(1, logits.size(1)):
                y = int(part["labels"][b, t])
                if y == -100:
                    continue
                logp = float(F.log_softmax(logits[b, t - 1], dim=-1)[y])
                w = math.exp(logp) ** 0.7 if weighted else 1.0
                terms.append(-w * logp)
        return sum(terms) / len(terms)

    with torch.no_grad():
        forget = -manual(batch["forget"], True)
        retain = manual(batch["retain"], False)
    assert math.isclose(parts["forget"].item(), forget, rel_tol=1e-5)
    assert math.isclose(parts["retain"].item(), retain, rel_tol=1e-5)
    assert math.isclose(loss.item(), 2.0 * forget + 0.5 * retain, rel_tol=1e-5)


def test_beta_zero_is_plain_gradient_ascent():
    from harness.losses import forward_logits, token_mean_nll

    tok = char_tokenizer()
    model = tiny_llama(tok)
    batch = _batch(tok)
    _, parts = WGA(beta=0.0).loss(model, batch, None)
    ga = -token_mean_nll(forward_logits(model, batch["forget"]), batch["forget"]["labels"])
    assert torch.allclose(parts["forget"], ga, rtol=1e-6)


def test_weights_carry_no_gradient():
    # d(forget) = -(1/N) sum_t w_t dNLL_t with w_t a constant: equal to the gradient with the weights
    # precomputed as numbers, and different from differentiating through the weights too
    from harness.losses import IGNORE, forward_logits, token_nll

    tok = char_tokenizer()
    model = tiny_llama(tok)
    part = _batch(tok)["forget"]
    mask = part["labels"][:, 1:] != IGNORE

    def grad_of(fn):
        model.zero_grad()
        fn().backward()
        return model.lm_head.weight.grad.clone()

    with torch.no_grad():
        w_const = (-token_nll(forward_logits(model, part), part["labels"])).exp()

    def through_weights():
        nll = token_nll(forward_logits(model, part), part["labels"])
        return -((-nll).exp() * nll)[mask].mean()

    def constant_weights():
        nll = token_nll(forward_logits(model, part), part["labels"])
        return -(w_const * nll)[mask].mean()

    g = grad_of(lambda: WGA(beta=1.0).loss(model, _batch(tok), None)[1]["forget"])
    assert torch.allclose(g, grad_of(constant_weights), atol=1e-7)
    assert not torch.allclose(g, grad_of(through_weights), atol=1e-5)
