"""The speed paths of scoring give the numbers of the plain paths: option sets scored from the
question's reused KV cache equal one full pass per answer (float tolerance), and the breakdown
the speed benchmark reads covers every primitive."""

import numpy as np
import pytest

from harness.metrics import Source
from harness.scoring.context import EvalContext
from harness.scoring.primitives import forward_stats, forward_stats_shared, shared_prefix_length

PERTURBED = ("forget_eval", "retain_eval", "real_authors", "world_facts")


@pytest.fixture(scope="module")
def env(tiny_full_dir):
    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import TINY_TEMPLATE
    from harness.plugins import get_registry

    reg = get_registry()
    return {"reg": reg, "task": reg.tasks["tofu_forget01"], "tok": load_tokenizer(str(tiny_full_dir)),
            "model": load_model(str(tiny_full_dir)).eval(), "template": TINY_TEMPLATE}


def _ctx(env, **kw):
    return EvalContext(env["task"], env["model"], env["tok"], env["template"], progress=False,
                       registry=env["reg"], limit=7, batch_size=8, **kw)


@pytest.mark.parametrize("mask", ["reference", "corrected"])
@pytest.mark.parametrize("role", PERTURBED)
def test_shared_prefix_equals_full_passes(env, role, mask):
    ctx = _ctx(env)
    items, layout = ctx._encode(Source(role=role, field="perturbed_answer", prompt="question"), generate=False)
    assert all(isinstance(g, list) and len(g) > 1 for g in layout)
    plens = [shared_prefix_length([items[i] for i in g]) for g in layout]
    assert min(plens) > 5  # the question really is shared (and skipped by the second pass)
    # batch 5 splits option sets across batches of different prefix widths (padding inside the cache)
    full = forward_stats(env["model"], items, ctx.pad_id, batch_size=5, attention_mask=mask, sort=False)
    shared = forward_stats_shared(env["model"], items, layout, ctx.pad_id, batch_size=5, attention_mask=mask)
    for a, b in zip(full, shared):
        assert b.avg_loss == pytest.approx(a.avg_loss, rel=1e-5)
        assert b.prob == pytest.approx(a.prob, rel=1e-5)
        assert a.lp.shape == b.lp.shape and np.allclose(a.lp, b.lp, atol=1e-5)
        assert (a.hit == b.hit).all()
    # unbatched full pass of one answer, by hand: the loss over its labels
    import torch

    it = items[layout[0][1]]
    ids = torch.tensor([it["input_ids"]])
    logits = env["model"](input_ids=ids).logits[0, :-1].float()
    lab = torch.tensor(it["labels"][1:])
    keep = lab != -100
    nll = torch.nn.functional.cross_entropy(logits[keep], lab[keep]).item()
    if mask == "corrected":  # no padding, no hidden eos inside one row: the by-hand pass is exact
        assert shared[layout[0][1]].avg_loss == pytest.approx(nll, rel=1e-5)


def test_truth_ratio_switch(env):
    """The metric values with and without the switch agree; the breakdown names every pass."""
    on, off = _ctx(env), _ctx(env, shared_prefix=False)
    for name in ("forget_truth_ratio", "retain_Truth_Ratio", "ra_Truth_Ratio", "wf_Q_A_Prob_normalised"):
        a, b = on.score(name), off.score(name)
        assert a.value == pytest.approx(b.value, rel=1e-6), name
        for i in b.per_sample:
            assert a.per_sample[i] == pytest.approx(b.per_sample[i], rel=1e-5)
    whats = {(e["what"], e["source"]) for e in on.timings}
    assert ("forward", "forget_eval.perturbed_answer") in whats and ("tokenise", "forget_eval.perturbed_answer") in whats
    assert all(e["seconds"] >= 0 and e["cpu"] >= 0 for e in on.timings)
    fw = [e for e in on.timings if e["what"] == "forward" and e["source"] == "forget_eval.perturbed_answer"][0]
    assert fw["rows"] == sum(len(r["perturbed_answer"]) for r in on.rows("forget_eval"))
