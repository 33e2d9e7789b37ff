"""GPU checks of parameter-efficient unlearning (skipped without CUDA): QLoRA (a 4-bit nf4 base loaded
through bitsandbytes, LoRA adapters on top) with NPO and the 8-bit AdamW, and the 8-bit optimizers
resolving to bitsandbytes' classes on CUDA.

    pytest tests/gpu -q
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_8bit_optimizers_are_bitsandbytes_on_cuda(name, cls):
    import bitsandbytes as bnb

    from harness.testing import tiny_llama
    from harness.training import TrainConfig, build_optimizer

    opt, resolved = build_optimizer(tiny_llama().cuda(), TrainConfig(optimizer=name))
    assert type(opt) is getattr(bnb.optim, cls) and resolved == name


def test_qlora_npo_trains_only_the_adapter_on_a_4bit_base(tmp_path):
    from harness.models.load import load_model
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import StartModel, TrainConfig, collate, unlearn
    from harness.training.adapters import peft_settings

    tok = char_tokenizer()
    forget, retain, _ = toy_data(tok)
    tiny_llama(tok, hidden=64).save_pretrained(tmp_path / "start")
    model = load_model(str(tmp_path / "start"), dtype="bfloat16", load_in_4bit=True)
    import bitsandbytes as bnb

    quantized = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized, "the base was not loaded in 4-bit"
    part = collate([{**it, "index": i} for i, it in enumerate(forget)], tok.pad_token_id)
    part = {k: v.cuda() for k, v in part.items()}
    before = StartModel(model, cache=False).sequence_logprob(part)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=2, per_device_batch=1, warmup_epochs=0, optimizer="adamw_8bit",
                      gradient_checkpointing=True, peft=peft_settings("lora", r=4, dropout=0.0, load_in_4bit=True))
    result = unlearn(model, tok, get_registry().methods["npo"](), forget, retain, cfg, cache_reference=False)
    assert result.info["optimizer"] == "adamw_8bit" and result.info["reference_source"] == "disabled adapter"
    trained = result.model
    moved = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert moved and all(p.abs().max() > 0 for p in moved)
    now = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
           for n, m in trained.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for n, w in quantized.items():
        assert torch.equal(now[n], w), n  # the 4-bit base is frozen
    ref = StartModel(trained, disable_adapter=True, cache=False).sequence_logprob(part)
    torch.testing.assert_close(ref, before)  # the disabled adapter is the 4-bit start model
    after = StartModel(trained, cache=False).sequence_logprob(part)
    assert after.mean() < before.mean()
