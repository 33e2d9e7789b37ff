"""The training loop itself: finetune, step plan, determinism, the log, errors."""

import math

import pytest
import torch

from harness import HarnessError
from harness.io import read_jsonl
from harness.losses import forward_logits, token_mean_nll
from harness.testing import tiny_llama, toy_data
from harness.training import TrainConfig, collate, finetune, plan


def _mean_nll(model, tok, items):
    batch = collate(items, tok.pad_token_id)
    with torch.no_grad():
        return float(token_mean_nll(forward_logits(model, batch), batch["labels"]))


def test_plan_matches_published_warmup_steps():
    # TOFU scripts: effective batch 32, warmup 1 epoch -> 12 / 6 / 1 steps for forget10/05/01 (spec 4.1).
    cfg = TrainConfig(batch_size=32, per_device_batch=4, warmup_epochs=1.0)
    assert [plan(cfg, n, 2)["warmup_steps"] for n in (400, 200, 40)] == [12, 6, 1]
    p = plan(cfg, 40, 2)
    # 20 examples per rank, 5 micro-batches of 4, grad accum 4 -> 2 optimizer steps (the last one partial).
    assert (p["grad_accum"], p["micro_batches_per_epoch"], p["steps_per_epoch"], p["total_steps"]) == (4, 5, 2, 20)
    # One process (e.g. CPU): no division by the visible GPU count, accumulation absorbs the world size.
    assert plan(cfg, 40, 1)["grad_accum"] == 8 and plan(cfg, 40, 1)["warmup_steps"] == 1


def test_batch_size_must_divide():
    with pytest.raises(HarnessError, match="not divisible"):
        TrainConfig(batch_size=30, per_device_batch=4).grad_accum(2)


def test_finetune_learns_is_deterministic_and_logs(tok, tmp_path):
    forget, retain, _ = toy_data(tok)
    items = forget + retain
    cfg = TrainConfig(epochs=3, lr=3e-3, batch_size=4, per_device_batch=2, warmup_epochs=1,
                      optimizer="adamw_torch")
    start = _mean_nll(tiny_llama(tok), tok, items)
    a = finetune(tiny_llama(tok), tok, items, cfg, out_dir=tmp_path / "a")
    b = finetune(tiny_llama(tok), tok, items, cfg, out_dir=tmp_path / "b")
    end = _mean_nll(a.model, tok, items)
    assert end < start - 0.3
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), n
    rows = read_jsonl(tmp_path / "a" / "train_log.jsonl")
    # 10 items, 2 per device, accum 2 -> 5 micro-batches -> 3 steps per epoch (last partial).
    assert len(rows) == 3 * 3 == a.info["total_steps"]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert rows[0]["lr"] == 0.0  # warmup: 10 // 4 = 2 steps, the first at lr 0
    assert rows[1]["lr"] == pytest.approx(1.5e-3) and rows[2]["lr"] == pytest.approx(3e-3)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows == read_jsonl(tmp_path / "b" / "train_log.jsonl")
    # A different seed gives a different order, hence different weights.
    c = finetune(tiny_llama(tok), tok, items, TrainConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(c.model.model.embed_tokens.weight, a.model.model.embed_tokens.weight)


def test_constant_schedule_and_clipping(tok, tmp_path):
    forget, retain, _ = toy_data(tok)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=2, per_device_batch=2, warmup_epochs=0, schedule="constant",
                      optimizer="adamw_torch", max_grad_norm=1e-3)
    finetune(tiny_llama(tok), tok, forget + retain, cfg, out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert {r["lr"] for r in rows} == {1e-3}
    # grad_norm is the pre-clipping norm (as HF logs it); the clip itself is checked in test_methods.
    assert all(r["grad_norm"] > 1e-3 for r in rows)


def test_nan_loss_stops_with_clear_error_and_keeps_log(tok, tmp_path):
    forget, retain, _ = toy_data(tok)
    model = tiny_llama(tok)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=2, per_device_batch=2, warmup_epochs=0, optimizer="adamw_torch")
    calls = {"n": 0}
    orig = model.forward

    def poisoned(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.logits = out.logits * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(HarnessError, match="loss became nan at optimizer step 3"):
        finetune(model, tok, forget + retain, cfg, out_dir=tmp_path)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]


def test_finetune_verb_builds_a_checkpoint(tmp_path):
    import dataclasses

    from transformers import AutoModelForCausalLM

    from harness.commands.finetune import main as finetune_main
    from harness.io import read_yaml
    from harness.options import FinetuneOptions

    args = FinetuneOptions(model="tiny:base", split="forget01", output=str(tmp_path / "ft"), epochs=1.0, lr=1e-3,
                           train_batch_size=8, per_device_batch=8, optimizer="adamw_torch")
    assert finetune_main(args) == 0
    doc = read_yaml(tmp_path / "ft" / "finetune.yaml")
    assert doc["rows"] == 40 and doc["plan"]["total_steps"] == 5 and doc["plan"]["warmup_steps"] == 5
    assert len(read_jsonl(tmp_path / "ft" / "train_log.jsonl")) == 5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft").num_parameters() > 0
    with pytest.raises(HarnessError, match="--split"):
        finetune_main(dataclasses.replace(args, split="retain42"))


def test_relaunch_commands(monkeypatch):
    from harness.training.distributed import CONFIG_DIR, launch_command, relaunch

    # an earlier in-process one-process ZeRO-3 test leaves LOCAL_RANK/RANK in this process's environment,
    # which reads as "already under a launcher"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HARNESS_LAUNCHED"):
        monkeypatch.delenv(k, raising=False)

    assert relaunch(["run", "-t", "x"], "single") == -1
    cmd, env = launch_command(["run", "-t", "tofu_forget01"], "zero3", num_processes=2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and env["HARNESS_LAUNCHED"] == "1"
    assert cmd[cmd.index("--config_file") + 1] == str(CONFIG_DIR / "zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["-m", "harness", "run", "-t", "tofu_forget01"]
    with pytest.raises(HarnessError, match="--accelerate 'nope'"):
        relaunch(["run"], "nope")
