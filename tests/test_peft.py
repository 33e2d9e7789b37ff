"""LoRA through peft: only the adapter trains, the reference is the disabled adapter (no copy), gradient
checkpointing trains the adapters, ZeRO-3 in one process, saving/merging, bad settings, 8-bit optimizers."""

import copy
import json
import types

import pytest
import torch

from harness import HarnessError
from harness.losses import forward_logits
from harness.plugins import get_registry
from harness.testing import tiny_llama, toy_data
from harness.training import StartModel, TrainConfig, collate, unlearn
from harness.training.adapters import attach, peft_settings

METHODS = get_registry().methods


@pytest.fixture(scope="module")
def data(tok):
    return toy_data(tok)


def _cfg(**kw):
    base = dict(epochs=2, lr=1e-2, batch_size=2, per_device_batch=1, warmup_epochs=0, optimizer="adamw_torch",
                peft=peft_settings("lora", r=4, dropout=0.0))
    return TrainConfig(**{**base, **kw})


def _start(tok, tmp_path):
    """A tiny Llama saved to disk, so that a separately loaded copy of the start model exists."""
    model = tiny_llama(tok)
    model.save_pretrained(tmp_path / "start")
    return model


def _load(path):
    from harness.models.load import load_model

    return load_model(str(path))


def _lora(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if prefix in n}


@pytest.mark.parametrize("name", ["npo", "idk_dpo"])
def test_reference_is_the_disabled_adapter_and_equals_a_separately_loaded_start_model(name, tok, data, tmp_path,
                                                                                     monkeypatch):
    import harness.training.loop as loop

    forget, retain, idk = data
    model = _start(tok, tmp_path)

    def no_model_copy(x, *a, **k):
        if isinstance(x, torch.nn.Module):
            raise AssertionError("LoRA training made a second copy of the weights for the reference")
        return copy.deepcopy(x, *a, **k)

    monkeypatch.setattr(loop, "copy", types.SimpleNamespace(deepcopy=no_model_copy))
    result = unlearn(model, tok, METHODS[name](), forget, retain, _cfg(), idk_items=idk if name == "idk_dpo" else None,
                     cache_reference=False)
    assert result.info["reference_source"] == "disabled adapter"
    trained = result.model
    assert any(p.abs().max() > 0 for p in _lora(trained, "lora_B").values())  # the adapter really moved
    part = collate([{**it, "index": i} for i, it in enumerate(forget)], tok.pad_token_id)
    ref = StartModel(trained, disable_adapter=True, cache=False).sequence_logprob(part)
    separate = StartModel(_load(tmp_path / "start"), cache=False).sequence_logprob(part)
    assert torch.equal(ref, separate)  # exactly, not approximately
    with torch.no_grad():  # and the adapted model itself does differ (the test could fail)
        adapted = StartModel(trained, cache=False).sequence_logprob(part)
    assert not torch.allclose(adapted, separate)
    assert trained.training is False  # disabling the adapter restored the mode it found


def test_lora_leaves_the_base_weights_untouched_and_lowers_forget_probability(tok, data, tmp_path):
    forget, retain, _ = data
    model = _start(tok, tmp_path)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    part = collate([{**it, "index": i} for i, it in enumerate(forget)], tok.pad_token_id)
    before = StartModel(model, cache=False).sequence_logprob(part)
    result = unlearn(model, tok, METHODS["npo"](), forget, retain, _cfg(epochs=3))
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in result.model.named_parameters() if "lora_" not in n}
    assert set(base) == set(start)
    for n, p in start.items():
        assert torch.equal(base[n], p), n
    assert result.info["trainable_parameters"] == sum(p.numel() for p in _lora(result.model, "lora_").values())
    after = StartModel(result.model, cache=False).sequence_logprob(part)
    assert after.mean() < before.mean() - 1.0  # NPO pushed the forget answers' log-probability down


@pytest.mark.parametrize("gc", [False, True])
def test_adapters_receive_gradients_under_gradient_checkpointing(gc, tok, data):
    forget, retain, _ = data
    model = tiny_llama(tok)
    result = unlearn(model, tok, METHODS["grad_diff"](), forget[:2], retain,
                     _cfg(epochs=1, batch_size=2, per_device_batch=2, gradient_checkpointing=gc))
    assert result.info["total_steps"] == 1
    moved = _lora(result.model, "lora_B")  # B starts at zero: one step moves it only if it got a gradient
    assert moved and all(p.abs().max() > 0 for p in moved.values())


def test_checkpointing_changes_nothing_but_memory(tok, data, tmp_path):
    from harness.io import read_jsonl

    forget, retain, _ = data
    logs = []
    for gc in (False, True):
        unlearn(tiny_llama(tok), tok, METHODS["npo"](), forget, retain, _cfg(gradient_checkpointing=gc),
                out_dir=tmp_path / str(gc))
        logs.append(read_jsonl(tmp_path / str(gc) / "train_log.jsonl"))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_zero3_one_process_lora_matches_single(tok, data, tmp_path):
    from harness.io import read_jsonl

    forget, retain, _ = data
    logs, models = {}, {}
    for mode in ("single", "zero3"):
        out = tmp_path / mode
        models[mode] = unlearn(tiny_llama(tok), tok, METHODS["npo"](), forget[:2], retain,
                               _cfg(epochs=1, accelerate=mode), out_dir=out, save_dir=out / "model")
        logs[mode] = read_jsonl(out / "train_log.jsonl")
    for a, b in zip(logs["single"], logs["zero3"]):
        for key in ("loss", "forget", "retain", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert models["zero3"].info["reference_source"] == "disabled adapter"
    single, z = dict(models["single"].model.named_parameters()), dict(models["zero3"].model.named_parameters())
    assert set(single) == set(z)
    for n, p in single.items():
        torch.testing.assert_close(p, z[n], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "zero3" / "model" / "adapter_model.safetensors").is_file()


def test_unknown_target_module_is_a_one_line_error_naming_modules(tok):
    with pytest.raises(HarnessError) as err:
        attach(tiny_llama(tok), peft_settings("lora", target_modules="q_proj,qkv"))
    msg = str(err.value)
    assert "\n" not in msg and "qkv" in msg and "q_proj" in msg and "down_proj" in msg


def test_peft_settings_flags_and_config_file(tmp_path):
    s = peft_settings("lora", r=8, alpha=16, target_modules="q_proj,v_proj")
    assert s["config"]["r"] == 8 and s["config"]["lora_alpha"] == 16 and s["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert peft_settings("lora")["config"]["target_modules"][-1] == "down_proj"  # Llama default: all linears
    f = tmp_path / "lora.json"
    f.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                             "base_model_name_or_path": "/somewhere"}))
    from_file = peft_settings(str(f))
    assert from_file["config"]["r"] == 2 and "base_model_name_or_path" not in from_file["config"]
    with pytest.raises(HarnessError, match="cannot be combined"):
        peft_settings(str(f), r=4)
    with pytest.raises(HarnessError, match="needs --peft"):
        peft_settings(None, r=4)
    f.write_text(json.dumps({"r": 2}))
    with pytest.raises(HarnessError, match="peft_type"):
        peft_settings(str(f))
    f.write_text(json.dumps({"peft_type": "LORA", "rank": 2}))
    with pytest.raises(HarnessError, match="bad PEFT config"):
        peft_settings(str(f))


def test_flags_without_peft_are_errors():
    from harness.cli import parse_options

    base = ["run", "-t", "tofu_forget01", "-m", "npo"]
    for extra, msg in ((["--lora-r", "4"], "needs --peft"), (["--merge"], "needs --peft"),
                       (["--peft", "lora", "--merge"], "needs --save-model"),
                       (["--peft", "lora", "--lora-dropout", "1.5"], r"\[0, 1\)")):
        with pytest.raises(HarnessError, match=msg):
            opts = parse_options([*base, *extra])
            from harness.commands.run import peft_of

            peft_of(opts)
    opts = parse_options([*base, "--peft", "lora", "--lora-r", "4", "--save-model", "--merge"])
    assert opts.peft == "lora" and opts.lora_r == 4 and opts.merge


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_fall_back_to_torch_adamw_on_cpu_and_say_so(name, tok):
    from harness.training import build_optimizer

    model = tiny_llama(tok)
    opt, resolved = build_optimizer(model, TrainConfig(optimizer=name))
    assert type(opt) is torch.optim.AdamW and resolved == f"adamw_torch (for {name} on CPU)"


def test_disabled_adapter_reference_forward_matches_logits_of_start(tok, data):
    """``ref.logits`` (KL retain losses) runs through the disabled adapter too."""
    forget, _, _ = data
    model = tiny_llama(tok)
    part = collate([{**it, "index": i} for i, it in enumerate(forget[:2])], tok.pad_token_id)
    with torch.no_grad():
        start = forward_logits(model, part)
    adapted = attach(model, peft_settings("lora", r=4))
    for p in (p for n, p in adapted.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p)
    assert torch.equal(StartModel(adapted, disable_adapter=True).logits(part), start)


def test_rmu_with_lora_trains_the_adapters_its_patterns_name_and_reads_the_disabled_adapter(tok, data):
    """RMU's trainable_params name base weights; with an adapter they select the adapter weights on them,
    and the retain targets (ref.activation) come from the disabled adapter."""
    forget, retain, _ = data
    method = METHODS["rmu"](module_regex=r"model\.layers\.1", trainable_params=r"model\.layers\.1\.mlp\.down_proj\.weight")
    result = unlearn(tiny_llama(tok), tok, method, forget, retain, _cfg(epochs=1))
    assert result.info["reference_source"] == "disabled adapter"
    moved = {n for n, p in _lora(result.model, "lora_B").items() if p.abs().max() > 0}
    assert moved == {"base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"}
