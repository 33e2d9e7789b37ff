"""unlearn(): pairing, cached reference log-probs, gradient checkpointing, saving, ZeRO-3 in one process."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from harness.io import read_jsonl
from harness.losses import forward_logits, token_mean_nll
from harness.methods import Method
from harness.plugins import get_registry
from harness.testing import tiny_llama, toy_data
from harness.training import TrainConfig, epoch_order, pairing_generator, unlearn

METHODS = get_registry().methods


@pytest.fixture(scope="module")
def data(tok):
    return toy_data(tok)


def _cfg(**kw):
    base = dict(epochs=2, lr=1e-3, batch_size=2, per_device_batch=1, warmup_epochs=1, optimizer="adamw_torch")
    return TrainConfig(**{**base, **kw})


@dataclass
class Recorder(Method):
    """Records which forget/retain/idk examples each micro-batch holds (a plugin-style method)."""

    name: ClassVar[str] = "recorder"
    uses_idk: ClassVar[bool] = True
    seen: ClassVar[list] = []

    def loss(self, model, batch, ref):
        Recorder.seen.append((batch["forget"]["index"].tolist(), batch["retain"]["index"].tolist(),
                              batch["idk"]["alt"].tolist()))
        f = batch["forget"]
        return token_mean_nll(forward_logits(model, f), f["labels"])


def _record(tok, data, seed):
    forget, retain, idk = data
    Recorder.seen = []
    unlearn(tiny_llama(tok), tok, Recorder(), forget, retain, _cfg(seed=seed, epochs=3, per_device_batch=2),
            idk_items=idk)
    return list(Recorder.seen)


def test_pairing_reproducible_per_seed_and_fresh_per_access(tok, data):
    a, b, c = _record(tok, data, 0), _record(tok, data, 0), _record(tok, data, 1)
    assert a == b
    assert a != c
    # every epoch visits each forget example once, in a reshuffled order
    epochs = [sorted(i for step in a[k * 2:(k + 1) * 2] for i in step[0]) for k in range(3)]
    assert epochs == [[0, 1, 2, 3]] * 3
    assert len({tuple(i for step in a[k * 2:(k + 1) * 2] for i in step[0]) for k in range(3)}) > 1
    # retain partners are drawn again at every access: the same forget example gets different partners
    partners: dict[int, set] = {}
    for f, r, _ in a:
        for i, j in zip(f, r):
            partners.setdefault(i, set()).add(j)
    assert any(len(s) > 1 for s in partners.values())


def test_pairing_differs_across_ranks_and_shards_cover_the_data():
    draws = [torch.randint(0, 1000, (8,), generator=pairing_generator(0, rank)).tolist() for rank in range(4)]
    assert len({tuple(d) for d in draws}) == 4
    assert draws[1] == torch.randint(0, 1000, (8,), generator=pairing_generator(0, 1)).tolist()
    assert draws[0] != torch.randint(0, 1000, (8,), generator=pairing_generator(1, 0)).tolist()
    shards = [epoch_order(10, 0, 0, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert shards[0] == epoch_order(10, 0, 0, 0, 2) and shards[0] != epoch_order(10, 0, 1, 0, 2)
    # uneven: ranks still get equal counts (wrapping), so they stay in step
    uneven = [epoch_order(5, 0, 0, r, 2) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 3 and set(uneven[0] + uneven[1]) == set(range(5))


def test_global_rng_is_not_used_for_pairing(tok, data):
    a = _record(tok, data, 0)
    torch.manual_seed(12345)
    torch.rand(100)
    assert _record(tok, data, 0) == a


@pytest.mark.parametrize("name", ["npo", "idk_dpo"])
def test_cached_reference_equals_recompute(name, tok, data, tmp_path):
    forget, retain, idk = data
    runs = {}
    for cache in (True, False):
        out = tmp_path / f"{name}-{cache}"
        model = unlearn(tiny_llama(tok), tok, METHODS[name](), forget, retain, _cfg(), idk_items=idk, out_dir=out,
                        cache_reference=cache)
        runs[cache] = (read_jsonl(out / "train_log.jsonl"), model)
    (cached, m1), (fresh, m2) = runs[True], runs[False]
    assert len(cached) == len(fresh) == 4
    for a, b in zip(cached, fresh):
        for key in ("loss", "forget", "retain"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    for p1, p2 in zip(m1.model.parameters(), m2.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    # cached: the forget set once (4 forwards of 1); recomputing: one forward per micro-batch (x2 for idk)
    per_step = 2 if name == "idk_dpo" else 1
    assert m2.info["reference_forwards"] == 8 * per_step
    assert m1.info["reference_forwards"] < m2.info["reference_forwards"]


def test_gradient_checkpointing_gives_the_same_run(tok, data, tmp_path):
    forget, retain, _ = data
    logs = []
    for gc in (False, True):
        unlearn(tiny_llama(tok), tok, METHODS["grad_diff"](), forget, retain, _cfg(gradient_checkpointing=gc),
                out_dir=tmp_path / str(gc))
        logs.append(read_jsonl(tmp_path / str(gc) / "train_log.jsonl"))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_idk_method_without_idk_items_is_a_clear_error(tok, data):
    from harness import HarnessError

    forget, retain, _ = data
    with pytest.raises(HarnessError, match="needs idk answers"):
        unlearn(tiny_llama(tok), tok, METHODS["idk_dpo"](), forget, retain, _cfg())


def test_zero3_one_process_npo_matches_single_and_saves_plain_checkpoint(tok, data, tmp_path):
    """DeepSpeed ZeRO-3 (gloo, CPU, torch client optimizer): same losses as one plain process, the reference
    sharded like the policy, a consolidated HF checkpoint, and plain models loadable afterwards."""
    from transformers import AutoModelForCausalLM

    forget, retain, _ = data
    logs, models = {}, {}
    for mode in ("single", "zero3"):
        out = tmp_path / mode
        models[mode] = unlearn(tiny_llama(tok), tok, METHODS["npo"](), forget[:2], retain, _cfg(epochs=1, accelerate=mode),
                               out_dir=out, save_dir=out / "model")
        logs[mode] = read_jsonl(out / "train_log.jsonl")
    # the launcher variables the one-process group needs stay in this process, marked as the harness's own:
    # this process does not count as launched, and a re-launched child does not inherit them (stale port)
    from harness.training import distributed

    assert {"LOCAL_RANK", "MASTER_PORT"} <= distributed.own_env_keys() and not distributed.under_launcher()
    _, child = distributed.launch_command(["run"], "ddp", num_processes=2)
    assert not (set(child) & distributed.own_env_keys()) and distributed.OWN_ENV not in child
    assert len(logs["zero3"]) == 1
    for a, b in zip(logs["single"], logs["zero3"]):
        for key in ("loss", "forget", "retain", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    z = models["zero3"].model
    assert z.model.embed_tokens.weight.shape == (len(tok), 32)  # gathered, not a 0-size shard
    for p1, p2 in zip(models["single"].model.parameters(), z.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "model")
    assert loaded.model.embed_tokens.weight.numel() > 0  # the ZeRO-3 config no longer partitions loads
    for (n, p1), p2 in zip(z.named_parameters(), loaded.parameters()):
        assert torch.equal(p1, p2), n
    batch = {"input_ids": torch.tensor([forget[0]["input_ids"]])}
    torch.testing.assert_close(forward_logits(loaded, batch), forward_logits(z, batch))


def test_idk_alternatives_encode_on_first_draw_and_match_eager_encoding(tok, monkeypatch):
    """The runner's idk items are the forget question with each bundled idk answer, encoded only when drawn."""
    from harness.data import items as data_items
    from harness.data.encode import Template, encode_qa
    from harness.data.splits import load_split

    task = get_registry().tasks["tofu_forget01"]
    tmpl = Template(user_start_tag="Question: ", user_end_tag="\n", asst_start_tag="Answer: ")
    rows = load_split(task.data_spec("forget"))[:3]
    idk = [r["text"] for r in load_split(task.data_spec("idk"))]
    calls = []
    real = data_items.encode_qa
    monkeypatch.setattr(data_items, "encode_qa", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    items = data_items.idk_items(task, tok, tmpl, rows, None, 512)
    assert len(items) == 3 and [len(alts) for alts in items] == [len(idk)] * 3 and len(idk) > 50
    assert calls == []
    got = items[2][7]
    want = encode_qa(tok, tmpl, rows[2]["question"], idk[7], max_length=512)
    assert calls == [idk[7]]
    assert got == want
    assert items[2][7] is got and items[2][-1]["input_ids"] != got["input_ids"]
    assert len(calls) == 2
    with pytest.raises(IndexError):
        items[0][len(idk)]
