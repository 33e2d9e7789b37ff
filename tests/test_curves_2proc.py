"""--eval-every / --keep-best with two CPU processes (gloo) under DDP and DeepSpeed ZeRO-3, launched the way
``--accelerate ddp|zero3`` does: every rank scores (under ZeRO-3 a consolidated copy, gathered by all ranks),
rank 0's values decide for all, and the best step's weights end up in the final model of every rank.

Run as a script this file is the worker: each rank unlearns with a ``PeriodicEval`` and records what it saw.
"""

import json
import os
import sys
from pathlib import Path

import pytest


def worker(out: Path, mode: str) -> None:
    import torch

    from harness.losses import forward_logits, token_mean_nll
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import TrainConfig, collate, distributed, unlearn
    from harness.training.periodic import PeriodicEval

    tok = char_tokenizer()
    forget, retain, _ = toy_data(tok)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=2, per_device_batch=1, warmup_epochs=0,
                      optimizer="adamw_torch", accelerate=mode)
    rank = int(os.environ["RANK"])
    # by its own values rank 1 would keep step 2 (the last); rank 0's (broadcast) keep step 1 on both ranks
    own = {0: [0.0, 1.0, 5.0], 1: [0.0, 5.0, 1.0]}[rank]
    sums, nlls = [], []
    batch = collate(forget, tok.pad_token_id, "reference")

    def score(model):
        nlls.append(float(token_mean_nll(forward_logits(model, batch), batch["labels"])))  # a real pass, every rank
        sums.append(float(sum(p.double().sum() for p in model.parameters())))
        return {"m": own[len(sums) - 1], "nll": nlls[-1]}

    ev = PeriodicEval(1, score, ("m", "min"))
    result = unlearn(tiny_llama(tok), tok, get_registry().methods["grad_diff"](), forget, retain, cfg, out_dir=out,
                     evaluator=ev)
    final = float(sum(p.double().sum() for p in result.model.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps({"sums": sums, "nlls": nlls, "final": final,
                                                      "info": result.info["during_training"],
                                                      "training": bool(result.model.training),
                                                      "grad": torch.is_grad_enabled()}))
    distributed.clean_exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_keep_best_two_processes(mode, tmp_path):
    from conftest import run_two_processes

    from harness.io import read_jsonl

    ranks = run_two_processes(__file__, tmp_path, mode, mode)
    # 4 forget rows, 2 per step (one per rank): 2 steps; scored at 0, 1, 2 on both ranks
    assert [len(r["sums"]) for r in ranks] == [3, 3]
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["nlls"] == ranks[1]["nlls"]  # the same model
    assert len(set(ranks[0]["sums"])) == 3  # ... which moved between scorings
    for r in ranks:
        assert r["info"]["keep_best"]["step"] == 1 and r["info"]["keep_best"]["value"] == 1.0
        assert r["final"] == r["sums"][1] != r["sums"][2]  # the best step's weights, on every rank
        assert not r["training"] and r["grad"]
    rows = read_jsonl(tmp_path / "train_log.jsonl")  # written once, by rank 0, with rank 0's values
    assert [(r["step"], r["eval/m"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 5.0)]
    assert [r["eval/nll"] for r in rows] == ranks[0]["nlls"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
