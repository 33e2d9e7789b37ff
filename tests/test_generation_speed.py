"""Generation that drops finished rows gives exactly what plain ``model.generate`` gives, on every
generation source of a TOFU and a MUSE task (the sources and settings their metrics use), and
pays fewer decoding steps; passes that compute fewer fields keep the fields they compute."""

import pytest

from harness.metrics import Source
from harness.scoring import primitives as P
from harness.scoring.context import EvalContext
from harness.scoring.greedy import plain_greedy


@pytest.fixture(scope="module")
def models():
    from harness.models.load import load_model, load_tokenizer
    from harness.models.profiles import checkpoint_path, finalize_template, resolve_model
    from harness.plugins import get_registry

    reg = get_registry()
    out = {}
    for task_name, kind in (("tofu_forget01", "tiny:full"), ("muse_news", "tiny:muse_news_target")):
        task = reg.tasks[task_name]
        path = checkpoint_path(kind)
        tok = load_tokenizer(path)
        choice = resolve_model("tiny", task, template_file=None, reference=None, retain=False)
        out[task_name] = (reg, task, load_model(path).eval(), tok, finalize_template(choice, tok))
    return out


def _generation_calls(models, task_name):
    """Every (source, max_new_tokens, stop) the task's default suite generates, recorded from a run."""
    reg, task, model, tok, template = models[task_name]
    calls = []
    real = P.generate

    def record(model, tokenizer, items, **kw):  # the call is what is recorded; the test generates below
        calls.append((items, kw))
        return [{"input": "", "ground_truth": "a", "generation": "a"} for _ in items]

    ctx = EvalContext(task, model, tok, template, progress=False, registry=reg, limit=4, batch_size=4)
    P.generate = record
    try:
        for name, args in task.metrics:
            if "ROUGE" in name or name == "model_utility":
                ctx.score(name, **args)
    finally:
        P.generate = real
    return calls


@pytest.mark.parametrize("task_name", ["tofu_forget01", "muse_news"])
def test_dropping_finished_rows_equals_plain_generate(models, task_name):
    reg, task, model, tok, template = models[task_name]
    assert plain_greedy(model)
    calls = _generation_calls(models, task_name)
    # TOFU: forget, retain, real authors, world facts; MUSE: forget/retain knowmem (stop strings), verbmem
    assert len(calls) == (4 if task_name.startswith("tofu") else 3)
    if task_name == "muse_news":
        assert any(kw["stop"] for _, kw in calls) and any(not kw["stop"] for _, kw in calls)
    for items, kw in calls:
        # batch 3: rows of different lengths and finishing steps share batches
        kw = {**kw, "batch_size": 3, "progress": None}
        plain_n, drop_n = {}, {}
        plain = P.generate(model, tok, items, **{**kw, "counts": plain_n, "drop_finished": False})
        drop = P.generate(model, tok, items, **{**kw, "counts": drop_n, "drop_finished": True})
        # the engine's batches by position budget (more rows per batch than batch_size)
        wide = P.generate(model, tok, items, **{**kw, "budget": 3 * 2048, "drop_finished": True})
        assert [d["generation"] for d in drop] == [p["generation"] for p in plain]
        assert drop == plain and wide == plain
        assert drop_n["new_tokens"] <= plain_n["new_tokens"]


def test_dropped_rows_pay_fewer_steps(models):
    """Rows that emit eos early leave the batch: on TOFU's forget questions the decoding steps paid
    are fewer than plain generate's (every row until the batch's longest is done)."""
    reg, task, model, tok, template = models["tofu_forget01"]
    ctx = EvalContext(task, model, tok, template, progress=False, registry=reg, limit=8, batch_size=8)
    items, _ = ctx._encode(Source(role="forget_eval"), generate=True)
    a, b = {}, {}
    P.generate(model, tok, items, batch_size=8, max_new_tokens=200, counts=a, drop_finished=False)
    P.generate(model, tok, items, batch_size=8, max_new_tokens=200, counts=b, drop_finished=True)
    assert b["new_tokens"] < a["new_tokens"]


def test_a_processor_in_the_generation_config_falls_back_to_generate(models):
    reg, task, model, tok, template = models["tofu_forget01"]
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not plain_greedy(model)
    finally:
        model.generation_config.repetition_penalty = old
    assert plain_greedy(model)


@pytest.mark.parametrize("need", ["prob", "tokens"])
def test_cheaper_passes_keep_their_fields_bit_identical(models, need):
    reg, task, model, tok, template = models["tofu_forget01"]
    ctx = EvalContext(task, model, tok, template, progress=False, registry=reg, limit=5, batch_size=4)
    items, _ = ctx._encode(Source(role="forget_eval", field="perturbed_answer"), generate=False)
    full = P.forward_stats(model, items, ctx.pad_id, batch_size=4, need="z")
    part = P.forward_stats(model, items, ctx.pad_id, batch_size=4, need=need)
    for a, b in zip(full, part):
        assert (a.avg_loss, a.prob) == (b.avg_loss, b.prob)
        assert b.z is None
        if need == "prob":
            assert b.lp is None and b.hit is None
        else:
            assert (a.lp == b.lp).all() and (a.hit == b.hit).all()


def test_a_pass_computed_for_less_is_redone_for_more(models):
    reg, task, model, tok, template = models["tofu_forget01"]
    ctx = EvalContext(task, model, tok, template, progress=False, registry=reg, limit=4, batch_size=4)
    src = Source(role="forget_eval", field="perturbed_answer")
    ctx.probability(src)
    assert ctx.stats(src, need="prob")[0][0].lp is None
    z = ctx.stats(src, need="z")[0][0].z
    assert z is not None and len(z) > 0
    assert ctx.stats(src, need="prob")[0][0].z is not None  # the fuller pass serves the cheaper reader
