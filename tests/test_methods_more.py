"""WGA, SatImp, CE-U and AltPO: each loss against a token-by-token computation (with the quirks: detached
weights, CE-U's first-answer-token exclusion on unshifted labels), AltPO's prepare step (5 alternates per
question, seeded, cached in the run directory and reused on resume), and short tiny-model runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from harness import HarnessError
from harness.losses import IGNORE, forward_logits, token_nll
from harness.plugins import get_registry
from harness.testing import FORGET_QA, TOY_TEMPLATE, one_step, tiny_llama, toy_data
from harness.training import Preparation, StartModel, TrainConfig, collate, unlearn
from harness.training.prepare import _cut

METHODS = get_registry().methods


def _batch(tok, forget_idx=(0, 1, 2), retain_idx=(1, 3)):
    forget, retain, _ = toy_data(tok)
    return {"forget": collate([{**forget[i], "index": i} for i in forget_idx], tok.pad_token_id),
            "retain": collate([{**retain[i], "index": i} for i in retain_idx], tok.pad_token_id)}


def _token_logps(model, part):
    """[(b, t, log p(label_t), logits row predicting it)] for every labelled position t >= 1."""
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits.float()
    out = []
    for b in range(logits.size(0)):
        for t in range(1, logits.size(1)):
            y = int(part["labels"][b, t])
            if y != IGNORE:
                out.append((b, t, float(F.log_softmax(logits[b, t - 1].detach(), -1)[y]), logits[b, t - 1].detach()))
    return out


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok, seed=3)
    with torch.no_grad():  # peaked predictions: token probabilities (and so the weights) differ widely
        m.lm_head.weight.mul_(40)
    return m


# ------------------------------------------------------------------------------------- WGA / SatImp
def test_wga_and_satimp_losses_by_hand(tok, model):
    batch = _batch(tok)
    with torch.no_grad():
        f = [lp for *_, lp, _ in _token_logps(model, batch["forget"])]
        retain = _mean([-lp for *_, lp, _ in _token_logps(model, batch["retain"])])
        loss, parts = METHODS["wga"](beta=0.7, gamma=2.0, alpha=0.5).loss(model, batch, None)
        wga = -_mean([math.exp(lp) ** 0.7 * -lp for lp in f])
        assert math.isclose(float(parts["forget"]), wga, rel_tol=1e-5)
        assert math.isclose(float(parts["retain"]), retain, rel_tol=1e-5)
        assert math.isclose(float(loss), 2.0 * wga + 0.5 * retain, rel_tol=1e-5)

        loss, parts = METHODS["satimp"](beta1=2.0, beta2=1.5, gamma=0.3, alpha=0.7).loss(model, batch, None)
        sat = -_mean([math.exp(lp) ** 2.0 * (1 - math.exp(lp)) ** 1.5 * -lp for lp in f])
        assert math.isclose(float(parts["forget"]), sat, rel_tol=1e-5)
        assert math.isclose(float(loss), 0.3 * sat + 0.7 * retain, rel_tol=1e-5)
        # the defaults are the config's (gamma 0.1 on forget, alpha 1 on retain), not the class's reverse
        loss, parts = METHODS["satimp"]().loss(model, batch, None)
        assert math.isclose(float(loss), 0.1 * float(parts["forget"]) + float(parts["retain"]), rel_tol=1e-6)
    from harness.methods import reference_of

    for name in ("wga", "satimp"):  # weights never need the start model; a KL retain term does
        assert reference_of(METHODS[name]()) == "none"
        assert reference_of(METHODS[name](retain_loss_type="KL")) == "model"


@pytest.mark.parametrize("name, weight", [
    ("wga", lambda p: p),                      # beta = 1
    ("satimp", lambda p: p ** 5 * (1 - p)),    # beta1 = 5, beta2 = 1
])
def test_weights_are_detached_gradient_is_weight_times_ce_gradient(tok, model, name, weight):
    batch = _batch(tok)
    f = batch["forget"]
    mask = f["labels"][:, 1:] != IGNORE

    def grad(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    with torch.no_grad():
        w = weight((-token_nll(forward_logits(model, f), f["labels"])).exp())  # numbers, no graph

    def constant():
        return -(w * token_nll(forward_logits(model, f), f["labels"]))[mask].mean()

    def through():
        ce = token_nll(forward_logits(model, f), f["labels"])
        return -(weight((-ce).exp()) * ce)[mask].mean()

    method = METHODS[name](alpha=0.0, gamma=1.0)
    g = grad(lambda: method.loss(model, batch, None)[1]["forget"])
    # relative to the gradient's size (SatImp's weights p^5 (1-p) are tiny on a random model)
    const, thru = grad(constant), grad(through)
    assert g.norm() > 0
    assert (g - const).norm() <= 1e-5 * const.norm()
    assert (g - thru).norm() > 1e-2 * thru.norm()
    model.zero_grad()


# ------------------------------------------------------------------------------------------- CE-U
def _ceu_by_hand(model, part, skip):
    """Mean over labelled positions, except each sequence's first ``skip`` UNSHIFTED valid labels, of
    -sum_v q(v) log p(v), q = softmax(logits with the true token's logit at -inf)."""
    terms = []
    valid_seen: dict[int, int] = {}
    labels = part["labels"]
    for b in range(labels.size(0)):
        valid_seen[b] = int(labels[b, 0] != IGNORE)  # label 0 counts on the unshifted labels
    for b, t, _, row in _token_logps(model, part):
        valid_seen[b] += 1
        if valid_seen[b] <= skip:
            continue
        y = int(labels[b, t])
        target = row.clone()
        target[y] = -math.inf
        q = F.softmax(target, -1)
        terms.append(float(-(q * F.log_softmax(row, -1)).sum()))
    return _mean(terms)


def test_ce_u_by_hand_excludes_the_first_answer_token(tok, model):
    batch = _batch(tok)
    with torch.no_grad():
        loss, parts = METHODS["ce_u"]().loss(model, batch, None)
        assert set(parts) == {"forget"}  # no retain term
        assert math.isclose(float(loss), _ceu_by_hand(model, batch["forget"], 1), rel_tol=1e-5)
        loss0 = METHODS["ce_u"](ignore_first_n_answer_tokens=0).loss(model, batch, None)[0]
        assert math.isclose(float(loss0), _ceu_by_hand(model, batch["forget"], 0), rel_tol=1e-5)
        assert not math.isclose(float(loss0), float(loss), rel_tol=1e-3)
        loss3 = METHODS["ce_u"](ignore_first_n_answer_tokens=3).loss(model, batch, None)[0]
        assert math.isclose(float(loss3), _ceu_by_hand(model, batch["forget"], 3), rel_tol=1e-5)


def test_ce_u_counts_on_unshifted_labels(tok, model):
    """With label 0 valid (no prompt mask), the unshifted cumsum spends the exclusion on label 0, which the
    shift drops anyway: nothing else is excluded (an exclusion on shifted labels would drop label 1)."""
    forget, _, _ = toy_data(tok)
    items = [{"input_ids": it["input_ids"], "labels": list(it["input_ids"]), "index": i}
             for i, it in enumerate(forget[:2])]
    batch = {"forget": collate(items, tok.pad_token_id)}
    with torch.no_grad():
        one = float(METHODS["ce_u"]().loss(model, batch, None)[0])
        zero = float(METHODS["ce_u"](ignore_first_n_answer_tokens=0).loss(model, batch, None)[0])
        two = float(METHODS["ce_u"](ignore_first_n_answer_tokens=2).loss(model, batch, None)[0])
    assert math.isclose(one, zero, rel_tol=1e-6)
    assert math.isclose(one, _ceu_by_hand(model, batch["forget"], 1), rel_tol=1e-5)
    assert math.isclose(two, _ceu_by_hand(model, batch["forget"], 2), rel_tol=1e-5) and not math.isclose(two, one)


# ------------------------------------------------------------------------------------------ AltPO
def _prep(tok, model, **kw):
    forget, _, _ = toy_data(tok)
    return Preparation(model, tok, forget, qa=list(FORGET_QA), template=TOY_TEMPLATE, **kw)


def test_altpo_prepare_gives_five_seeded_alternates_per_question(tok, model):
    method = METHODS["altpo"](max_new_tokens=12)
    state = torch.get_rng_state()
    start = _prep(tok, model, seed=0)
    out = method.prepare(start)
    assert torch.equal(torch.get_rng_state(), state)  # sampling used its own seeded RNG
    assert start.generate_calls == 5  # 4 questions in one batch, sampled 5 times
    forget, _, _ = toy_data(tok)
    assert len(out["forget"]) == len(out["alternate"]) == 5 * len(FORGET_QA)
    for k, (orig, alt) in enumerate(zip(out["forget"], out["alternate"])):
        q = FORGET_QA[k // 5][0]
        assert orig == forget[k // 5]
        prompt = tok(f"Question: {q}\nAnswer: ")["input_ids"]
        assert alt["input_ids"][:len(prompt)] == prompt and alt["labels"][:len(prompt)] == [IGNORE] * len(prompt)
        assert alt["input_ids"][-1] == tok.eos_token_id
    texts = [tok.decode([t for t in a["labels"] if t != IGNORE], skip_special_tokens=True) for a in out["alternate"]]
    assert len(set(texts)) > 1  # sampled, not greedy
    again = method.prepare(_prep(tok, model, seed=0))
    assert again == out
    other = method.prepare(_prep(tok, model, seed=1))
    assert other["alternate"] != out["alternate"]


def test_prepare_cache_is_reused_on_resume_and_a_partial_file_is_rebuilt(tok, model, tmp_path):
    method = METHODS["altpo"](max_new_tokens=8)
    first = _prep(tok, model, cache_dir=tmp_path)
    out = method.prepare(first)
    path = tmp_path / "altpo_alternates.json"
    assert first.generate_calls == 5 and path.is_file()
    mtime = path.stat().st_mtime_ns
    resumed = _prep(tok, model, cache_dir=tmp_path)
    assert method.prepare(resumed) == out and resumed.generate_calls == 0
    assert path.stat().st_mtime_ns == mtime
    # other settings in the same directory: built again, not read as the old ones
    assert METHODS["altpo"](max_new_tokens=8, n_alternates=2).prepare(_prep(tok, model, cache_dir=tmp_path))
    # a torn file (as a crash before the atomic rename could never leave, but a copy could) is rebuilt
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    torn = _prep(tok, model, cache_dir=tmp_path)
    method.prepare(torn)
    assert torn.generate_calls == 5 and json.loads(path.read_text())["value"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_unlearn_runs_prepare_once_per_run_directory(tok, tmp_path, monkeypatch):
    calls = []
    real = Preparation._sample
    monkeypatch.setattr(Preparation, "_sample", lambda self, *a: calls.append(1) or real(self, *a))
    forget, retain, _ = toy_data(tok)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=20, per_device_batch=10, warmup_epochs=0,
                      optimizer="adamw_torch", schedule="constant")
    method = METHODS["altpo"](max_new_tokens=8)
    runs = [unlearn(tiny_llama(tok), tok, method, forget, retain, cfg, out_dir=tmp_path, template=TOY_TEMPLATE,
                    forget_qa=FORGET_QA) for _ in range(2)]
    assert len(calls) == 1  # the second run (a resume) read the cache
    assert (tmp_path / "prepare" / "altpo_alternates.json").is_file()
    for r in runs:
        assert r.info["steps_per_epoch"] == 1 and r.info["micro_batches_per_epoch"] == 2  # 20 rows
    a, b = (dict(r.model.named_parameters()) for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)  # same alternates, same training


def test_altpo_loss_is_dpo_with_the_alternate_preferred(tok):
    model, start_model = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    out = METHODS["altpo"](max_new_tokens=6).prepare(_prep(tok, start_model))
    _, retain, _ = toy_data(tok)
    idx = [0, 6, 13]
    batch = {"forget": collate([{**out["forget"][i], "index": i} for i in idx], tok.pad_token_id),
             "alternate": collate([{**out["alternate"][i], "index": i} for i in idx], tok.pad_token_id),
             "retain": collate([{**retain[i], "index": i} for i in (0, 1)], tok.pad_token_id)}
    ref = StartModel(start_model, cache=False)

    def seq(m, part):
        per = [0.0] * part["input_ids"].size(0)
        for b, _, lp, _ in _token_logps(m, part):
            per[b] += lp
        return per

    with torch.no_grad():
        win, lose = seq(model, batch["alternate"]), seq(model, batch["forget"])
        rwin, rlose = seq(start_model, batch["alternate"]), seq(start_model, batch["forget"])
        beta = 0.5
        dpo = _mean([-(2 / beta) * -math.log1p(math.exp(-beta * ((w - rw) - (lo - rl))))
                     for w, rw, lo, rl in zip(win, rwin, lose, rlose)])
        retain_nll = _mean([-lp for *_, lp, _ in _token_logps(model, batch["retain"])])
        loss, parts = METHODS["altpo"](beta=beta, alpha=2.0, gamma=1.5).loss(model, batch, ref)
    assert math.isclose(float(parts["forget"]), dpo, rel_tol=1e-5)
    assert math.isclose(float(loss), 1.5 * dpo + 2.0 * retain_nll, rel_tol=1e-5)


def test_altpo_needs_question_answer_data_and_stop_strings_cut(tok, model):
    forget, _, _ = toy_data(tok)
    with pytest.raises(HarnessError, match="needs question/answer forget data"):
        METHODS["altpo"]().prepare(Preparation(model, tok, forget))
    assert _cut(" Mira wrote it.\nQuestion: Who", ("Question:", "Q:")) == "Mira wrote it."
    assert _cut("born in 1950 Q: where", ("Question:", "Q:")) == "born in 1950"


def test_one_step_of_altpo_trains_on_every_alternate(tok):
    result = one_step(METHODS["altpo"](max_new_tokens=6), tiny_llama(tok), tok)
    assert result.changed and math.isfinite(result.loss)
    assert math.isclose(result.parts["forget"], (2 / 0.1) * math.log(2), rel_tol=1e-5)  # policy = reference


# ------------------------------------------------------------------------- short runs on the tiny model
def test_short_runs_lower_the_forget_answer_probability():
    from harness.data.items import training_items
    from harness.losses import sequence_nll
    from harness.methods import build_method
    from harness.models.load import load_model, load_tokenizer
    from harness.models.profiles import finalize_template, resolve_model

    task = get_registry().tasks["tofu_forget01"]
    choice = resolve_model(None, task)
    tok = load_tokenizer(choice.tokenizer_path())
    template = finalize_template(choice, tok)
    forget, rows = training_items(task, tok, template, "forget", None, 8, 512)
    retain, _ = training_items(task, tok, template, "retain", None, 8, 512)
    probe = collate(forget, tok.pad_token_id)

    def prob(m):
        with torch.no_grad():
            nll = sequence_nll(forward_logits(m, probe), probe["labels"])
        return float((-(nll / (probe["labels"] != IGNORE).sum(-1))).exp().mean())

    before = prob(load_model(choice.start_path(), dtype="float32"))
    cfg = TrainConfig(epochs=2, lr=5e-4, batch_size=4, per_device_batch=4, warmup_epochs=0,
                      optimizer="adamw_torch", schedule="constant")
    for name, sets in [("wga", {}), ("satimp", {}), ("ce_u", {}), ("altpo", {"max_new_tokens": "16"})]:
        model = load_model(choice.start_path(), dtype="float32")
        result = unlearn(model, tok, build_method(METHODS[name], sets), forget, retain, cfg, template=template,
                         forget_qa=[(r["question"], r["answer"]) for r in rows])
        assert prob(result.model) < before, name


@pytest.mark.parametrize("task", ["tofu_forget01", "tofu_forget10", "muse_news", "muse_books"])
def test_tasks_carry_the_reference_experiments_defaults(task):
    t = get_registry().tasks[task]
    assert t.method_defaults("wga") == ({"beta": 1.0}, {"lr": 1e-5, "epochs": 5})
    assert t.method_defaults("satimp") == ({"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0},
                                           {"lr": 1e-5, "epochs": 5})
    altpo = t.method_defaults("altpo")
    if task.startswith("tofu"):
        assert altpo == ({"beta": 0.1, "alpha": 1.0}, {"lr": 1e-5, "epochs": 2})
    else:  # no question/answer forget data on MUSE
        assert altpo == ({}, {})


def test_a_failing_or_malformed_prepare_step_is_one_line_naming_the_method(tok, model):
    from dataclasses import dataclass
    from typing import ClassVar

    from harness.methods import Method
    from harness.plugins import guard_method
    from harness.training.prepare import run_prepare

    @dataclass
    class Broken(Method):
        name: ClassVar[str] = "broken_prep"
        shape: str = "raise"

        def prepare(self, start):
            if self.shape == "raise":
                return {}["missing"]
            return {"forget": start.items, "alternate": start.items[:1]}

        def loss(self, model, batch, ref):  # pragma: no cover - never trained
            raise NotImplementedError

    start = _prep(tok, model)
    with pytest.raises(HarnessError, match=r"method 'broken_prep' from plugin 'drafts/b.py' failed in prepare\(\): "
                                           r"KeyError"):
        run_prepare(guard_method(Broken(), "broken_prep", "drafts/b.py"), start)
    with pytest.raises(HarnessError, match="part 'alternate' has 1 items for 4 forget items"):
        run_prepare(Broken(shape="short"), start)
