"""Core capabilities any method plugin gets (activation capture, trainable-parameter selection, reference
activations/logits, per-run state, a seeded method generator, per-task method defaults) and the losses of
RMU, UNDIAL and PDU against hand computations on small batches, with every quirk of spec section 3."""

import json
import re

import pytest
import torch
from conftest import cheap_task_yaml, run_cli

from harness import HarnessError
from harness.activations import capture, find_module
from harness.io import read_jsonl
from harness.losses import forward_logits
from harness.methods import TrainingState, method_generator
from harness.plugins import get_registry
from harness.testing import batch, tiny_llama, toy_data
from harness.training import StartModel, TrainConfig, unlearn

METHODS = get_registry().methods


def _cfg(**kw):
    base = dict(epochs=1, lr=1e-3, batch_size=4, per_device_batch=4, warmup_epochs=0, weight_decay=0.0,
                schedule="constant", optimizer="adamw_torch")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tok):
    return toy_data(tok)


@pytest.fixture(scope="module")
def two_parts(tok, data):
    forget, retain, _ = data
    return batch(forget[:2], retain[:3], tokenizer=tok)  # answers of different lengths: padding, masks


# ------------------------------------------------------------------------------------ activations


def test_capture_returns_the_layer_output_and_removes_its_hook(tok, two_parts):
    model = tiny_llama(tok)
    part = two_parts["forget"]
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                       output_hidden_states=True).hidden_states
        hooks = [len(m._forward_hooks) for m in model.modules()]  # transformers keeps hooks of its own
        with capture(model, r"model\.layers\.0") as act:
            assert len(layer._forward_hooks) == hooks[list(model.modules()).index(layer)] + 1
            forward_logits(model, part)
    assert act.name == "model.layers.0"
    torch.testing.assert_close(act.output, hidden[1])  # the hidden states after decoder layer 0
    with pytest.raises(RuntimeError), capture(model, r"model\.layers\.1"):
        raise RuntimeError("the hook goes even when the forward fails")
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_activation_regex_must_full_match_exactly_one_module(tok):
    model = tiny_llama(tok)
    with pytest.raises(HarnessError, match=r"regex 'model.*layers.*7' full-matches no module") as e:
        find_module(model, r"model\.layers\.7")
    assert "\n" not in str(e.value) and "model.embed_tokens" in str(e.value)
    with pytest.raises(HarnessError, match="full-matches 2 modules"):
        find_module(model, r"model\.layers\.\d")
    assert find_module(model, r"model\.norm")[0] == "model.norm"


def test_reference_activation_is_the_frozen_models_without_grad(tok, two_parts):
    model, start = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    part = two_parts["retain"]
    ref = StartModel(start, cache=False)
    with torch.enable_grad():
        out = ref.activation(part, r"model\.layers\.1")
    assert not out.requires_grad and ref.forwards == 1
    with torch.no_grad(), capture(start, r"model\.layers\.1") as want:
        forward_logits(start, part)
    torch.testing.assert_close(out, want.output)
    with torch.no_grad(), capture(model, r"model\.layers\.1") as other:
        forward_logits(model, part)
    assert not torch.allclose(out, other.output)  # the frozen start model's, not the policy's
    with pytest.raises(HarnessError, match="reference activations but declares reference='logprobs'"):
        StartModel(start, allow_logits=False).activation(part, r"model\.layers\.1")


# ------------------------------------------------------------------------------------ RMU


def _hand_activation_loss(a, z, labels):
    """mean_b [ sum_t M_bt mean_d (a - z)^2 / sum_t M_bt ] with explicit loops."""
    total = 0.0
    for b in range(a.shape[0]):
        num, cnt = 0.0, 0
        for t in range(a.shape[1]):
            if labels[b, t] != -100:
                zz = z[0, 0] if z.shape[0] == 1 else z[b, t]
                num += float(((a[b, t] - zz) ** 2).mean())
                cnt += 1
        total += num / cnt
    return total / a.shape[0]


def test_rmu_loss_is_the_masked_per_sequence_mean_of_the_activation_mse(tok, two_parts):
    model, start = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    rmu = METHODS["rmu"](module_regex=r"model\.layers\.1", steering_coeff=3.0, alpha=0.7, gamma=1.3)
    run = TrainingState(seed=5)
    rmu.setup(run)
    before = torch.random.get_rng_state()
    loss, parts = rmu.loss(model, two_parts, StartModel(start, cache=False))
    assert torch.equal(before, torch.random.get_rng_state()), "RMU drew from the global RNG"
    u = torch.rand(1, 1, 32, generator=method_generator(5))
    control = 3.0 * u / u.norm()
    acts = {}
    for name, net in (("cur", model), ("ref", start)):
        for p in ("forget", "retain"):
            with torch.no_grad(), capture(net, r"model\.layers\.1") as c:
                forward_logits(net, two_parts[p])
            acts[name, p] = c.output
    f, r = two_parts["forget"]["labels"], two_parts["retain"]["labels"]
    forget = _hand_activation_loss(acts["cur", "forget"], control, f)
    retain = _hand_activation_loss(acts["cur", "retain"], acts["ref", "retain"], r)
    assert float(parts["forget"]) == pytest.approx(forget, rel=1e-5)
    assert float(parts["retain"]) == pytest.approx(retain, rel=1e-5)
    assert float(loss) == pytest.approx(1.3 * forget + 0.7 * retain, rel=1e-5)
    # a token mean over the batch (not per sequence) would differ: the two answers have different lengths
    token_mean = float((((acts["cur", "forget"] - control) ** 2).mean(-1) * (f != -100)).sum() / (f != -100).sum())
    assert (f != -100).sum(-1).unique().numel() == 2 and abs(token_mean - forget) > 1e-6
    assert run.records["rmu_control_vector"] == pytest.approx(control.flatten()[:8].tolist(), abs=1e-6)


def test_method_generator_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = torch.rand(4, generator=TrainingState(seed=7).generator)
    b = torch.rand(4, generator=TrainingState(seed=7).generator)
    c = torch.rand(4, generator=TrainingState(seed=8).generator)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())


def test_rmu_updates_only_the_selected_parameters_with_gradients_everywhere(tok, data, tmp_path):
    forget, retain, _ = data
    sel = r"model\.layers\.1\.mlp\.down_proj\.weight"
    runs = {}
    for key, pattern in (("all", ".*"), ("one", sel)):
        model = tiny_llama(tok, layers=2)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        method = METHODS["rmu"](module_regex=r"model\.layers\.1", trainable_params=pattern)
        res = unlearn(model, tok, method, forget, retain, _cfg(), out_dir=tmp_path / key)
        changed = {n for n, p in res.model.named_parameters() if not torch.equal(p, start[n])}
        runs[key] = (changed, read_jsonl(tmp_path / key / "train_log.jsonl")[0], res.info)
    assert runs["one"][0] == {"model.layers.1.mlp.down_proj.weight"}
    assert len(runs["all"][0]) > 10
    # the same first-step gradients (computed for every parameter) give the same pre-clipping norm
    assert runs["one"][1]["grad_norm"] == pytest.approx(runs["all"][1]["grad_norm"], rel=1e-6)
    assert runs["one"][1]["loss"] == pytest.approx(runs["all"][1]["loss"], rel=1e-6)
    info = runs["one"][2]["trainable_params"]
    assert info["patterns"] == [sel] and info["tensors"] == 1 and info["numel"] == 32 * 64
    assert runs["one"][2]["method_records"]["rmu_control_vector"] == runs["all"][2]["method_records"]["rmu_control_vector"]


def test_trainable_params_matching_nothing_is_one_line_naming_the_regex(tok, data):
    forget, retain, _ = data
    method = METHODS["rmu"](module_regex=r"model\.layers\.1", trainable_params=r"model\.layers\.9\..*")
    with pytest.raises(HarnessError) as e:
        unlearn(tiny_llama(tok), tok, method, forget, retain, _cfg())
    msg = str(e.value)
    assert "\n" not in msg and r"'model\\.layers\\.9\\..*'" in msg and "model.embed_tokens.weight" in msg


# ------------------------------------------------------------------------------------ UNDIAL


def _llama_v128(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def n_ignored(part):
    return int((part["labels"][:, 1:] == -100).sum())


def test_undial_loss_wraps_ignored_labels_to_v_minus_100_and_averages_all_positions(two_parts):
    model, start = _llama_v128(1), _llama_v128(2)  # V = 128: the ignored index -100 penalises token 28
    undial = METHODS["undial"](beta=3.0, alpha=0.5)
    loss, parts = undial.loss(model, two_parts, StartModel(start, cache=False))
    f = two_parts["forget"]
    with torch.no_grad():
        s, z = forward_logits(model, f), forward_logits(start, f)
    B, T, V = s.shape

    def hand(wrap: bool, all_positions: bool) -> float:
        total, n = 0.0, 0
        for b in range(B):
            for t in range(T - 1):
                y = int(f["labels"][b, t + 1])
                if y == -100 and not all_positions:
                    continue
                zz = z[b, t].clone()
                if y != -100 or wrap:
                    zz[y if y != -100 else V - 100] -= 3.0
                q = torch.softmax(zz, -1)
                total += float(-(q * torch.log_softmax(s[b, t], -1)).sum())
                n += 1
        return total / n

    forget = hand(wrap=True, all_positions=True)
    assert n_ignored(f) > 0
    assert float(parts["forget"]) == pytest.approx(forget, rel=1e-5)
    assert float(loss) == pytest.approx(forget + 0.5 * float(parts["retain"]), rel=1e-5)
    # both quirks change the number: no penalty at ignored positions, or a mean over label tokens only
    assert abs(hand(wrap=False, all_positions=True) - forget) > 1e-6
    assert abs(hand(wrap=True, all_positions=False) - forget) > 1e-6
    assert undial.alpha == 0.5 and METHODS["undial"]().alpha == 0.0 and METHODS["undial"]().beta == 10.0


# ------------------------------------------------------------------------------------ PDU


def test_pdu_loss_uses_unshifted_label_positions_and_updates_the_dual_per_call(tok, two_parts):
    model = tiny_llama(tok, seed=1)
    pdu = METHODS["pdu"](retain_loss_eps=0.3, alpha=2.0, gamma=1.5, dual_step_size=0.5, dual_warmup_epochs=1)
    run = TrainingState(seed=0)
    pdu.setup(run)
    f, r = two_parts["forget"], two_parts["retain"]
    with torch.no_grad():
        lf = forward_logits(model, f)
        from harness.losses import token_mean_nll

        retain = float(token_mean_nll(forward_logits(model, r), r["labels"]))
    vals = [float((lf[b, t].max() - lf[b, t].mean()) ** 2)
            for b in range(lf.shape[0]) for t in range(lf.shape[1]) if f["labels"][b, t] != -100]
    forget = sum(vals) / len(vals)
    loss, parts = pdu.loss(model, two_parts, None)  # epoch 0 < warmup 1: no dual update yet
    assert float(parts["forget"]) == pytest.approx(forget, rel=1e-5)
    assert float(loss) == pytest.approx(1.5 * forget + 2.0 * (retain - 0.3), rel=1e-5)
    assert pdu.log_state() == {"retain_preference": 2.0}
    run.epoch = 1
    loss2, _ = pdu.loss(model, two_parts, None)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)  # the loss uses the dual before its update
    assert pdu.log_state()["retain_preference"] == pytest.approx(max(0.0, 2.0 + 0.5 * (retain - 0.3)), rel=1e-6)
    # shifted-label positions would give another value (the off-by-one is the reference's)
    shifted = [float((lf[b, t].max() - lf[b, t].mean()) ** 2)
               for b in range(lf.shape[0]) for t in range(lf.shape[1] - 1) if f["labels"][b, t + 1] != -100]
    assert abs(sum(shifted) / len(shifted) - forget) > 1e-6


def test_pdu_dual_updates_every_micro_batch_under_gradient_accumulation(tok, data, tmp_path):
    forget, retain, _ = data
    pdu = METHODS["pdu"](retain_loss_eps=0.3, alpha=1.0, dual_step_size=0.5, dual_warmup_epochs=1)
    seen = []
    loss = pdu.loss

    def recording(model, batch, ref):  # what the loop hands the method, micro-batch by micro-batch
        out = loss(model, batch, ref)
        seen.append((pdu._run.epoch, float(out[1]["retain"])))
        return out

    pdu.loss = recording
    unlearn(tiny_llama(tok), tok, pdu, forget, retain, _cfg(epochs=2, per_device_batch=1), out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert len(rows) == 2 and len(seen) == 8  # 2 epochs x 1 step x 4 micro-batches
    dual = 1.0
    for epoch, r in seen:
        if epoch >= 1:
            dual = max(0.0, dual + 0.5 * (r - 0.3))
    assert rows[0]["retain_preference"] == 1.0  # warm-up epoch: no update
    assert rows[1]["retain_preference"] == pytest.approx(dual, rel=1e-6)
    assert dual != pytest.approx(max(0.0, 1.0 + 0.5 * (sum(r for e, r in seen if e >= 1) / 4 - 0.3)), rel=1e-3)


def _hand_token_mean_nll(model, part):
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = part["labels"][:, 1:]
    valid = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked * valid).sum() / valid.sum())


@pytest.mark.parametrize("warmup", [1, 2])
def test_pdu_epoch_dual_update_is_one_step_per_epoch_from_a_no_grad_pass(tok, data, tmp_path, warmup):
    forget, retain, _ = data
    pdu = METHODS["pdu"](retain_loss_eps=0.3, alpha=1.0, dual_step_size=0.5, dual_warmup_epochs=warmup,
                         dual_update_upon="epoch")
    passes = []
    epoch_end = pdu.epoch_end

    def recording(model, batches):  # the pass core hands the method, redone here by hand
        seen = list(batches())
        assert not model.training and not torch.is_grad_enabled()
        passes.append((pdu._run.epoch, pdu._dual, [_hand_token_mean_nll(model, b["retain"]) for b in seen]))
        epoch_end(model, lambda: iter(seen))

    pdu.epoch_end = recording
    unlearn(tiny_llama(tok), tok, pdu, forget, retain, _cfg(epochs=2, per_device_batch=1), out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert [(e, len(nll)) for e, _, nll in passes] == [(0, 4), (1, 4)]  # one pass of 4 micro-batches per epoch
    dual = 1.0
    for epoch, before, nll in passes:
        assert before == pytest.approx(dual, rel=1e-6)  # the micro-batches never moved it
        if epoch + 1 >= warmup:  # epochs done reach the warm-up (the reference's on_epoch_end)
            dual = max(0.0, dual + 0.5 * (sum(nll) / len(nll) - 0.3))
    assert rows[0]["retain_preference"] == 1.0
    # the step after epoch 0's end logs what that end made of it (unchanged under a 2-epoch warm-up)
    assert rows[1]["retain_preference"] == pytest.approx(passes[1][1], rel=1e-12)
    assert (rows[1]["retain_preference"] != 1.0) == (warmup == 1)
    assert pdu.log_state()["retain_preference"] == pytest.approx(dual, rel=1e-6)
    assert dual != 1.0


# ------------------------------------------------------------------------------------ task defaults


def _task(tmp_path, extra=""):
    d = tmp_path / f"tasks{len(list(tmp_path.glob('tasks*')))}"  # a new directory: registries are cached
    d.mkdir()
    (d / "mc_task.yaml").write_text(cheap_task_yaml("mc_task", "methods defaults test") + extra)
    return d


def _dry(tmp_path, *argv):
    tasks = sorted(tmp_path.glob("tasks*"), key=lambda p: int(p.name[5:]))[-1]
    rc, out, err = run_cli("run", "-t", "mc_task", "--model", "tiny:full", "--include-tasks", tasks,
                           "-o", tmp_path / "res", "--dry-run", *argv, check=False)
    if rc != 0:
        assert len(err.strip().splitlines()) == 1, err
        raise HarnessError(err.strip())
    return out


def test_task_method_defaults_precedence(tmp_path):
    _task(tmp_path, "methods:\n  undial: {beta: 3.0, training: {lr: 1.0e-4, epochs: 10, weight_decay: 0.0}}\n")
    out = _dry(tmp_path, "-m", "undial,pdu")
    line = out.split("x undial")[1]
    assert "beta: 3.0" in line.split("\n")[1]            # task default over the class default (10)
    assert "lr: 0.0005" in line and "epochs: 2," in line  # the tiny profile's training wins over the task's
    assert "weight_decay: 0.0" in line                    # a task override the profile does not set applies
    assert "retain_loss_eps: 0.3" in out.split("x pdu")[1]  # TOFU's PDU default from the base
    out = _dry(tmp_path, "-m", "undial", "--set", "undial.beta=5", "--lr", "2e-4")
    assert "beta: 5.0" in out and "lr: 0.0002" in out     # flags over everything
    # RMU: the tiny profile picks a layer the 2-layer model has; trainable_params is part of the run hash
    a, b = _dry(tmp_path, "-m", "rmu"), _dry(tmp_path, "-m", "rmu", "--set", r"rmu.trainable_params=model\..*")
    assert r"module_regex: model\.layers\.0" in a
    assert re.search(r"-> (\S+)", a).group(1) != re.search(r"-> (\S+)", b).group(1)


def test_task_method_defaults_errors(tmp_path):
    _task(tmp_path, "methods:\n  undial: {betta: 3.0}\n")
    with pytest.raises(HarnessError, match=r"mc_task\.yaml.*methods\.undial: method 'undial' has no hyper-parameter 'betta'"):
        _dry(tmp_path, "-m", "undial")
    _task(tmp_path, "methods:\n  undial: {training: {lrr: 1.0e-4}}\n")
    with pytest.raises(HarnessError, match=r"methods\.undial\.training: unknown key 'lrr'"):
        _dry(tmp_path, "-m", "undial")
    _task(tmp_path, "methods:\n  pdu: {retain_loss_eps: null}\n")  # a task without PDU's eps
    with pytest.raises(HarnessError) as e:
        _dry(tmp_path, "-m", "pdu")
    assert "\n" not in str(e.value) and "needs retain_loss_eps" in str(e.value) and "mc_task" in str(e.value)
    assert "retain_loss_eps: 0.2" in _dry(tmp_path, "-m", "pdu", "--set", "pdu.retain_loss_eps=0.2")


def test_shipped_task_defaults_follow_the_published_experiments():
    tasks = get_registry().tasks
    for name in ("tofu_forget01", "tofu_forget05", "tofu_forget10"):
        t = tasks[name]
        assert t.method_defaults("pdu") == ({"retain_loss_eps": 0.3, "alpha": 100.0, "dual_step_size": 5.0,
                                             "dual_warmup_epochs": 5}, {})
        assert t.method_defaults("undial")[1] == {"lr": 1.0e-4, "epochs": 10}
    assert tasks["muse_news"].method_defaults("pdu")[0]["retain_loss_eps"] == 1.5
    assert tasks["muse_books"].method_defaults("pdu")[0] == {"alpha": 50.0, "dual_step_size": 1.0,
                                                            "dual_warmup_epochs": 3, "retain_loss_eps": 0.1}
    rmu = METHODS["rmu"]()
    assert (rmu.steering_coeff, rmu.module_regex, rmu.trainable_params, rmu.alpha, rmu.gamma) == \
        (2.0, r"model\.layers\.7", ".*", 1.0, 1.0)
    pdu = METHODS["pdu"]()
    assert (pdu.retain_loss_eps, pdu.primal_dual, pdu.dual_step_size, pdu.dual_update_upon,
            pdu.dual_warmup_epochs) == (None, True, 1.0, "step", 5)


def test_rmu_under_zero3_one_process_matches_single(tok, data, tmp_path):
    """Hooks on the module (not parameter reads) and the frozen reference's activations work with ZeRO-3
    partitioned parameters; the optimizer's subset is honoured there too."""
    forget, retain, _ = data
    logs, models = {}, {}
    for mode in ("single", "zero3"):
        method = METHODS["rmu"](module_regex=r"model\.layers\.1", trainable_params=r"model\.layers\.1\..*")
        model = tiny_llama(tok)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = unlearn(model, tok, method, forget[:2], retain, _cfg(batch_size=2, per_device_batch=2, accelerate=mode),
                      out_dir=tmp_path / mode)
        logs[mode] = read_jsonl(tmp_path / mode / "train_log.jsonl")[0]
        models[mode] = {n: not torch.equal(p, start[n]) for n, p in res.model.named_parameters()}
    for key in ("loss", "forget", "retain"):
        assert logs["zero3"][key] == pytest.approx(logs["single"][key], rel=1e-5), key
    # DeepSpeed clips (and reports the norm of) the optimizer's parameters only, as under the reference's
    # ZeRO-3 runs; a single process clips over every parameter, as HF's Trainer does
    assert logs["zero3"]["grad_norm"] < logs["single"]["grad_norm"]

    assert models["zero3"] == models["single"] and any(models["zero3"].values())
    assert {n for n, c in models["zero3"].items() if c} <= {n for n in models["zero3"] if n.startswith("model.layers.1.")}


def test_short_tiny_runs_unlearn(tmp_path):
    """On the embedded tiny model with the shipped task defaults: UNDIAL and PDU lower the forget-set
    answer probability; RMU moves layer-0 forget activations toward its control vector (its forget term,
    logged per step, falls from the first epoch to the second over the same forget rows)."""
    _task(tmp_path)
    out = tmp_path / "res"
    run_cli("run", "-t", "mc_task", "--model", "tiny:full", "--include-tasks", sorted(tmp_path.glob("tasks*"))[0],
            "-m", "undial,pdu,rmu", "--limit", "16", "-o", out)
    probs = {}
    for f in out.rglob("scores.json"):
        probs[f.parent.parent.name] = json.loads(f.read_text())["metrics"]["forget_Q_A_Prob"]["value"]
    assert probs["undial"] < probs["finetuned"] and probs["pdu"] < probs["finetuned"], probs
    log = read_jsonl(next(out.rglob("rmu/*/train_log.jsonl")))
    first = [r["forget"] for r in log if r["epoch"] <= 1.0]
    second = [r["forget"] for r in log if r["epoch"] > 1.0]
    assert len(first) == len(second) == 2 and sum(second) < sum(first)
    pdu_log = read_jsonl(next(out.rglob("pdu/*/train_log.jsonl")))
    assert all(r["retain_preference"] == 100.0 for r in pdu_log)  # 2 tiny epochs < 5 warm-up epochs
