"""The Method contract: the declared reference kind drives what core keeps of the start model, Literal
hyper-parameters are checked generically, old ``needs_reference`` plugins map onto it, ``harness ls
methods`` shows each default configuration's need, and harness.testing's loss-checking helpers."""

import copy
import gc
import math
import re
import weakref
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
import torch
from conftest import ROOT, run_cli

from harness import HarnessError
from harness.losses import forward_logits, npo_loss, sequence_logprob, token_mean_nll
from harness.methods import Method, build_method, reference_of
from harness.plugins import get_registry
from harness.testing import batch, encode_items, frozen_reference, load, tiny_llama, toy_data
from harness.training import TrainConfig, unlearn
from harness.training import loop as train_loop

METHODS = get_registry().methods


def _cfg(**kw):
    base = dict(epochs=2, lr=1e-3, batch_size=2, per_device_batch=1, warmup_epochs=1, optimizer="adamw_torch")
    return TrainConfig(**{**base, **kw})


@dataclass
class Probe(Method):
    """A plugin-style method that records the ``ref`` it gets and asks of it what its kind allows."""

    name: ClassVar[str] = "probe"
    reference: ClassVar[str] = "none"
    refs: ClassVar[list] = []

    def loss(self, model, batch, ref):
        Probe.refs.append(ref)
        f = batch["forget"]
        out = token_mean_nll(forward_logits(model, f), f["labels"])
        if self.reference in ("logprobs", "model"):
            out = out + 0 * ref.sequence_logprob(f, "forget").sum()
        if self.reference == "model":
            out = out + 0 * ref.logits(f).sum()
        return out


def _probe(kind):
    return type(f"Probe_{kind}", (Probe,), {"reference": kind, "__annotations__": {}})


def _unlearn(tok, data, method, **kw):
    forget, retain, idk = data
    return unlearn(tiny_llama(tok), tok, method, forget, retain, _cfg(), idk_items=idk if method.uses_idk else None,
                   **kw)


@pytest.fixture(scope="module")
def data(tok):
    return toy_data(tok)


def test_reference_none_makes_no_frozen_copy(tok, data, monkeypatch):
    copies = _copies(monkeypatch)
    Probe.refs = []
    info = _unlearn(tok, data, _probe("none")()).info
    assert info["reference"] == "none" and "reference_forwards" not in info
    assert Probe.refs and all(r is None for r in Probe.refs)
    assert copies == []
    assert _unlearn(tok, data, METHODS["grad_ascent"]()).info["reference"] == "none"


def _copies(monkeypatch) -> list:
    """Weak references to every model the training loop deep-copies (the frozen start model)."""
    copies = []
    real = copy.deepcopy

    def tracking(obj, *a):
        out = real(obj, *a)
        if isinstance(obj, torch.nn.Module):
            copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(train_loop.copy, "deepcopy", tracking)
    return copies


@dataclass
class AliveDuringTraining(Method):
    """Records, at each step, whether the frozen copies are still alive (after a garbage collection)."""

    name: ClassVar[str] = "alive"
    reference: ClassVar[str] = "logprobs"
    copies: ClassVar[list] = []
    alive: ClassVar[list] = []

    def loss(self, model, batch, ref):
        gc.collect()
        AliveDuringTraining.alive.append([c() is not None for c in self.copies])
        f = batch["forget"]
        return npo_loss(sequence_logprob(forward_logits(model, f), f["labels"]), ref.sequence_logprob(f), 0.1)


def test_reference_logprobs_precomputes_once_and_releases_the_copy(tok, data, monkeypatch):
    Probe.refs = []
    info = _unlearn(tok, data, _probe("logprobs")()).info
    # 4 forget examples precomputed one per forward; the 8 training micro-batches hit the memo
    assert info["reference"] == "logprobs" and info["reference_forwards"] == 4
    assert info["reference_released"] and Probe.refs[0].model is None
    # released means freed: no frozen copy is alive while training runs
    AliveDuringTraining.copies, AliveDuringTraining.alive = _copies(monkeypatch), []
    _unlearn(tok, data, AliveDuringTraining())
    assert len(AliveDuringTraining.copies) == 1 and AliveDuringTraining.alive == [[False]] * 8
    AliveDuringTraining.alive = []
    _unlearn(tok, data, type("AliveModel", (AliveDuringTraining,), {"reference": "model"})())
    assert AliveDuringTraining.alive[-1] == [False, True]  # the first run's copy is gone, this one is kept
    npo = _unlearn(tok, data, METHODS["npo"]()).info
    assert (npo["reference"], npo["reference_forwards"], npo["reference_released"]) == ("logprobs", 4, True)


def test_reference_logprobs_forbids_live_logits(tok, data):
    @dataclass
    class Liar(Method):
        name: ClassVar[str] = "liar"
        reference: ClassVar[str] = "logprobs"

        def loss(self, model, batch, ref):
            return forward_logits(model, batch["forget"]).mean() + ref.logits(batch["forget"]).mean()

    with pytest.raises(HarnessError, match="declares reference='logprobs'.*declare reference='model'"):
        _unlearn(tok, data, Liar())


def test_reference_model_keeps_the_live_frozen_model(tok, data):
    info = _unlearn(tok, data, _probe("model")()).info
    # the 4 forget log-probs on first use (memoised, not precomputed) + one live-logits forward per
    # micro-batch (2 epochs x 4)
    assert (info["reference"], info["reference_forwards"], info["reference_released"]) == ("model", 12, False)
    kl = _unlearn(tok, data, build_method(METHODS["npo"], {"retain_loss_type": "KL"})).info
    assert (kl["reference"], kl["reference_forwards"], kl["reference_released"]) == ("model", 12, False)
    # a live-reference method that never asks for log-probs runs only its teacher forwards (no precompute)
    undial = _unlearn(tok, data, METHODS["undial"]()).info
    assert (undial["reference"], undial["reference_forwards"]) == ("model", 8)


def test_idk_methods_with_logprobs_keep_the_copy_for_drawn_pairs(tok, data):
    info = _unlearn(tok, data, METHODS["idk_dpo"]()).info
    assert info["reference"] == "logprobs" and not info["reference_released"]
    # forget set once (4) plus each distinct drawn (example, idk answer) pair once: at most 8 draws
    assert 4 < info["reference_forwards"] <= 4 + 8


@pytest.mark.parametrize("name, params, kind", [
    ("grad_ascent", {}, "none"), ("simnpo", {}, "none"),
    ("grad_diff", {}, "none"), ("grad_diff", {"retain_loss_type": "KL"}, "model"),
    ("npo", {}, "logprobs"), ("npo", {"retain_loss_type": "KL"}, "model"),
    ("idk_dpo", {}, "logprobs"), ("idk_dpo", {"retain_loss_type": "KL"}, "model"),
    ("rmu", {}, "model"), ("undial", {}, "model"), ("pdu", {"retain_loss_eps": 0.3}, "none"),
])
def test_builtin_reference_needs_per_configuration(name, params, kind):
    method = build_method(METHODS[name], params)
    assert reference_of(method) == kind
    assert method.needs_reference == (kind != "none")  # the deprecated reader still answers


@dataclass
class LegacyModel(Method):
    name: ClassVar[str] = "legacy_model"
    needs_reference: ClassVar[bool] = True

    def loss(self, model, batch, ref):
        f = batch["forget"]
        return token_mean_nll(forward_logits(model, f), f["labels"]) + 0 * ref.logits(f).sum()


@dataclass
class LegacyLogprobs(Method):
    name: ClassVar[str] = "legacy_logprobs"
    needs_reference: ClassVar[bool] = True
    reference_logprobs_only: ClassVar[bool] = True

    def loss(self, model, batch, ref):
        f = batch["forget"]
        return npo_loss(sequence_logprob(forward_logits(model, f), f["labels"]), ref.sequence_logprob(f), 0.1)


@dataclass
class LegacyPerInstance(Method):
    """The old documented way: switch the need on per instance in __post_init__."""

    name: ClassVar[str] = "legacy_instance"
    retain_loss_type: str = "NLL"

    def __post_init__(self):
        self.needs_reference = self.retain_loss_type == "KL"

    def loss(self, model, batch, ref):  # pragma: no cover - not trained here
        raise NotImplementedError


def test_legacy_needs_reference_declarations_map_onto_reference(tok, data, monkeypatch):
    import importlib.util
    import sys

    # loaded under another name: sys.modules must not hold the example before test_plugins_pkg installs it
    src = ROOT / "examples" / "harness-example-method" / "harness_example_method" / "__init__.py"
    spec = importlib.util.spec_from_file_location("example_maxent_unregistered", src)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses resolve ClassVar through it
    spec.loader.exec_module(example)
    assert reference_of(example.MaxEnt()) == "none"  # the example plugin declares needs_reference = False
    assert reference_of(LegacyModel()) == "model"
    assert reference_of(LegacyLogprobs()) == "logprobs"
    assert reference_of(LegacyPerInstance()) == "none" and not LegacyPerInstance().needs_reference
    assert reference_of(LegacyPerInstance("KL")) == "model" and LegacyPerInstance("KL").needs_reference
    # and core acts on the mapped kind
    info = _unlearn(tok, data, LegacyModel()).info
    assert (info["reference"], info["reference_released"]) == ("model", False)
    info = _unlearn(tok, data, LegacyLogprobs()).info
    assert (info["reference"], info["reference_forwards"], info["reference_released"]) == ("logprobs", 4, True)


def test_invalid_reference_declaration_is_one_line():
    bad = type("BadRef", (Probe,), {"reference": "sometimes", "name": "badref", "__annotations__": {}})
    with pytest.raises(HarnessError, match=r"^method 'badref': reference must be one of none, logprobs, model, "
                                           r"got 'sometimes'$"):
        build_method(bad, {})


@dataclass
class Choices(Method):
    name: ClassVar[str] = "choices"
    mode: Literal["sum", "mean"] = "mean"
    order: Literal[1, 2] = 1

    def loss(self, model, batch, ref):  # pragma: no cover - not trained here
        raise NotImplementedError


def test_literal_fields_are_checked_and_coerced():
    msg = "method 'npo': retain_loss_type must be one of NLL, KL, got 'MSE'"
    with pytest.raises(HarnessError) as err:
        build_method(METHODS["npo"], {"retain_loss_type": "MSE"})
    assert str(err.value) == msg
    for name in ("grad_diff", "idk_dpo"):
        with pytest.raises(HarnessError, match=f"^method '{name}': retain_loss_type must be one of NLL, KL, got 'kl'$"):
            build_method(METHODS[name], {"retain_loss_type": "kl"})
    with pytest.raises(HarnessError, match="retain_loss_type must be one of NLL, KL"):
        METHODS["npo"](retain_loss_type="mse")  # direct construction too
    assert build_method(METHODS["npo"], {"retain_loss_type": "KL"}).retain_loss_type == "KL"
    got = build_method(Choices, {"mode": "sum", "order": "2"})  # --set gives strings
    assert (got.mode, got.order) == ("sum", 2) and isinstance(got.order, int)
    with pytest.raises(HarnessError, match=r"^method 'choices': order must be one of 1, 2, got '3'$"):
        build_method(Choices, {"order": "3"})


def test_set_retain_loss_type_on_the_command_line(tmp_path):
    _, out, _ = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.retain_loss_type=KL", "--dry-run",
                        "-o", tmp_path)
    assert "retain_loss_type: KL" in out
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.retain_loss_type=MSE",
                         "--dry-run", "-o", tmp_path, check=False)
    assert rc == 2 and "method 'npo': retain_loss_type must be one of NLL, KL, got 'MSE'" in err
    assert len(err.strip().splitlines()) == 1


def test_ls_methods_shows_the_reference_each_default_configuration_needs():
    _, out, _ = run_cli("ls", "methods")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert out.splitlines()[1].split()[:5] == ["name", "display", "reference", "idk", "from"]
    want = {"grad_ascent": ("none", "no"), "grad_diff": ("none", "no"), "npo": ("logprobs", "no"),
            "idk_dpo": ("logprobs", "yes"), "simnpo": ("none", "no"), "rmu": ("model", "no"),
            "undial": ("model", "no"), "pdu": ("none", "no")}
    for name, (kind, idk) in want.items():
        assert tuple(rows[name][2:4]) == (kind, idk), rows[name]
    assert re.search(r"^\s+npo .*retain_loss_type=NLL \(NLL\|KL\)", out, re.M)
    assert re.search(r"^\s+pdu .*retain_loss_eps=\(required\), .*dual_warmup_epochs=5", out, re.M)
    assert re.search(r"^\s+rmu .*steering_coeff=2.0, module_regex=model\\.layers\\.7, trainable_params=\.\*", out, re.M)
    assert re.search(r"^\s+undial .*gamma=1.0, alpha=0.0, beta=10.0", out, re.M)


# ---------------------------------------------------------------------------------------------------
# harness.testing: checking a loss on your own data


def _doc_snippet() -> str:
    text = (ROOT / "docs" / "plugins.md").read_text()
    block = text.split("<!-- snippet: testing-loss -->", 1)[1]
    return block.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_plugins_doc_snippet_runs_on_the_tiny_model(tmp_path, monkeypatch, tiny_full_dir, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_doc_snippet(), "docs/plugins.md", "exec"), ns)
    loss, parts, model, ref = ns["loss"], ns["parts"], ns["model"], ns["ref"]
    # an unchanged model against its own frozen copy: NPO's forget term is (2/beta) ln 2
    assert parts["forget"].item() == pytest.approx(20 * math.log(2), rel=1e-6)
    assert ref.model is not model and not any(p.requires_grad for p in ref.model.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the retain term equals a hand computation from the tiny model's own template file
    from harness.data.encode import encode_qa
    from harness.models.profiles import checkpoint_template

    item = encode_qa(ns["tok"], checkpoint_template(tiny_full_dir), "Who wrote Stone Rivers?", "Oskar Penn wrote it.")
    assert ns["retain"] == [item]
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        nll = token_mean_nll(forward_logits(model, {"input_ids": ids, "attention_mask": None}),
                             torch.tensor([item["labels"]]))
    assert parts["retain"].item() == pytest.approx(float(nll), rel=1e-5)
    assert loss.item() == pytest.approx(parts["forget"].item() + parts["retain"].item(), rel=1e-6)
    assert capsys.readouterr().out.startswith("loss ")


def test_batch_is_exactly_what_training_hands_the_method(tok, data):
    forget, retain, idk = data
    seen = []

    @dataclass
    class Capture(Method):
        name: ClassVar[str] = "capture"
        uses_idk: ClassVar[bool] = True

        def loss(self, model, b, ref):
            seen.append({k: {n: t.clone() for n, t in part.items()} for k, part in b.items()})
            return token_mean_nll(forward_logits(model, b["forget"]), b["forget"]["labels"])

    unlearn(tiny_llama(tok), tok, Capture(), forget, retain, _cfg(epochs=1, per_device_batch=2), idk_items=idk)
    for got in seen:
        fi, ri, alt = (got[k]["index" if k != "idk" else "alt"].tolist() for k in ("forget", "retain", "idk"))
        want = batch([forget[i] for i in fi], [retain[j] for j in ri], [idk[i][a] for i, a in zip(fi, alt)],
                     tokenizer=tok, alts=alt)
        # testing.batch numbers items by position; training by dataset row: only index differs
        assert want["forget"]["index"].tolist() == [0, 1] and want["idk"]["alt"].tolist() == alt
        for part in ("forget", "retain", "idk"):
            assert set(want[part]) == set(got[part])
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(want[part][key], got[part][key]), (part, key)


def test_encode_items_and_frozen_reference(tok, tmp_path, tiny_full_dir):
    from harness.data.encode import Template

    tmpl = Template(user_start_tag="Question: ", user_end_tag="\n", asst_start_tag="Answer: ", asst_end_tag="")
    (tmp_path / "t.yaml").write_text('user_start_tag: "Question: "\nuser_end_tag: "\\n"\nasst_start_tag: "Answer: "\n'
                                     'asst_end_tag: ""\n')
    pairs = [("Who wrote X?", "Y did."), {"question": "Where?", "answer": "Here."}]
    items = encode_items(tok, pairs, tmpl)
    assert items == encode_items(tok, pairs, tmp_path / "t.yaml")
    assert items[0] == toy_encode(tok, "Who wrote X?", "Y did.")
    with pytest.raises(HarnessError, match="unknown template key"):
        (tmp_path / "bad.yaml").write_text("user_tag: x\n")
        encode_items(tok, pairs, tmp_path / "bad.yaml")

    model = tiny_llama(tok)
    part = batch(items, tokenizer=tok)["forget"]
    ref = frozen_reference(model)
    before = ref.logits(part)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(ref.logits(part), before)  # a copy: later updates of the model do not leak in
    assert frozen_reference(model, METHODS["grad_ascent"]()) is None
    with pytest.raises(HarnessError, match="reference='logprobs'"):
        frozen_reference(model, METHODS["npo"]()).logits(part)

    loaded, ltok = load(tiny_full_dir)
    assert not loaded.training and ltok.pad_token_id is not None
    assert len(ltok) <= loaded.get_input_embeddings().weight.shape[0]


def toy_encode(tok, q, a):
    from harness.testing import encode

    return encode(tok, q, a)
