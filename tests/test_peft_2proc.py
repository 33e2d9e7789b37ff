"""LoRA NPO and IdkDPO with two CPU processes (gloo) under DDP and DeepSpeed ZeRO-3, launched the way
``--accelerate ddp|zero3`` does; the reference is the policy with its adapter disabled, on every rank.

Run as a script this file is the worker: each rank unlearns and records what it holds, then exits
through ``clean_exit``.
"""

import json
import os
import sys
from pathlib import Path

import pytest


def worker(out: Path, mode: str) -> None:
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import TrainConfig, distributed, unlearn
    from harness.training.adapters import peft_settings

    tok = char_tokenizer()
    forget, retain, idk = toy_data(tok)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=2, per_device_batch=1, warmup_epochs=0,
                      optimizer="adamw_torch", accelerate=mode, peft=peft_settings("lora", r=4, dropout=0.0))
    methods = get_registry().methods
    npo = unlearn(tiny_llama(tok), tok, methods["npo"](), forget, retain, cfg, out_dir=out, save_dir=out / "model")
    # idk pairs are memoised lazily: ranks miss at different times and still run the reference together
    idk_run = unlearn(tiny_llama(tok), tok, methods["idk_dpo"](), forget, retain, cfg, idk_items=idk)
    start = dict(tiny_llama(tok).named_parameters())  # the same seeded initialisation
    rank = int(os.environ["RANK"])
    rows = {}
    for name, result in (("npo", npo), ("idk_dpo", idk_run)):
        params = dict(result.model.named_parameters())
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in params.items() if "lora_" not in n}
        rows[name] = {
            "info": result.info,
            "checksum": float(sum(p.double().sum() for p in params.values())),
            "base_untouched": all(bool((base[n] == p).all()) for n, p in start.items()),
            "lora_moved": all(float(p.abs().max()) > 0 for n, p in params.items() if "lora_B" in n),
            "embed_numel": result.model.get_base_model().model.embed_tokens.weight.numel(),
        }
    (out / f"rank{rank}.json").write_text(json.dumps({"world": int(os.environ["WORLD_SIZE"]), **rows}))
    distributed.clean_exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_lora_two_processes(mode, tmp_path):
    from conftest import run_two_processes

    ranks = run_two_processes(__file__, tmp_path, mode, mode)
    assert [r["world"] for r in ranks] == [2, 2]
    for name in ("npo", "idk_dpo"):
        a, b = ranks[0][name], ranks[1][name]
        assert a["info"]["world_size"] == 2 and a["info"]["reference_source"] == "disabled adapter"
        assert a["checksum"] == b["checksum"]  # every rank holds the same (consolidated) model
        assert a["base_untouched"] and b["base_untouched"] and a["lora_moved"]
        assert a["embed_numel"] > 0  # a plain model, not a ZeRO-3 shard
        assert a["info"]["reference_forwards"] == b["info"]["reference_forwards"]  # in lock-step
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
