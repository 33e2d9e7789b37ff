"""NPO under DeepSpeed ZeRO-3 with two CPU processes (gloo), launched the way ``--accelerate zero3`` does.

Run as a script this file is the worker: each rank unlearns, records its retain partners and the
consolidated weights, and exits through ``clean_exit``.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from harness.methods import Method

SEEN: list = []


@dataclass
class RecordingNPO(Method):
    name: ClassVar[str] = "recording_npo"
    needs_reference: ClassVar[bool] = True
    reference_logprobs_only: ClassVar[bool] = True

    def loss(self, model, batch, ref):
        from harness.plugins import get_registry

        SEEN.append(batch["retain"]["index"].tolist())
        return get_registry().methods["npo"]().loss(model, batch, ref)


def worker(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import TrainConfig, distributed, unlearn

    tok = char_tokenizer()
    forget, retain, idk = toy_data(tok)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=2, per_device_batch=1, warmup_epochs=1,
                      optimizer="adamw_torch", accelerate="zero3")
    model = unlearn(tiny_llama(tok), tok, RecordingNPO(), forget, retain, cfg, out_dir=out, save_dir=out / "model")
    rank = int(os.environ["RANK"])
    checksum = float(sum(p.double().sum() for p in model.model.parameters()))
    # IdkDPO memoises reference log-probs of idk pairs lazily: ranks miss at different times and must
    # still run the sharded reference together (otherwise this hangs).
    idk_model = unlearn(tiny_llama(tok), tok, get_registry().methods["idk_dpo"](), forget, retain,
                        TrainConfig(**{**cfg.__dict__, "epochs": 1}), idk_items=idk)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": int(os.environ["WORLD_SIZE"]), "seen": SEEN, "checksum": checksum,
        "info": model.info, "idk_info": idk_model.info, "embed_numel": model.model.model.embed_tokens.weight.numel(),
        # the evaluation-after-ZeRO-3 gotcha: loads after training must give plain, unpartitioned models
        "reloaded_numel": AutoModelForCausalLM.from_pretrained(out / "model").model.embed_tokens.weight.numel()}))
    distributed.clean_exit(0)


@pytest.mark.slow
def test_npo_zero3_two_processes(tmp_path):
    from conftest import run_two_processes

    from harness.io import read_jsonl

    ranks = run_two_processes(__file__, tmp_path, "zero3", timeout=300)
    assert [r["world"] for r in ranks] == [2, 2]
    # each rank drew its own retain partners from its own generator
    assert ranks[0]["seen"] != ranks[1]["seen"]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 4  # 2 examples per rank per epoch
    # every rank holds the same consolidated (unsharded) model
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["embed_numel"] > 0 and ranks[0]["reloaded_numel"] == ranks[1]["reloaded_numel"] > 0
    assert ranks[0]["info"]["grad_accum"] == 1 and ranks[0]["info"]["world_size"] == 2
    # the forget set is precomputed on every rank (4 forwards), idk pairs on demand, in lock-step
    assert all(r["idk_info"]["reference_forwards"] >= 4 for r in ranks)
    assert ranks[0]["idk_info"]["reference_forwards"] == ranks[1]["idk_info"]["reference_forwards"]
    rows = read_jsonl(tmp_path / "train_log.jsonl")  # written once, by rank 0
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / "model" / "model.safetensors").is_file()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
