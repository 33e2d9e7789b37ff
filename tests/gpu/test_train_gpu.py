"""GPU checks of the training core (skipped without CUDA): NCCL + bf16 ZeRO-3 NPO as ``--accelerate zero3``
launches it, and the published optimizer (bitsandbytes paged AdamW 32-bit) in one process.

    pytest tests/gpu -q          # on a machine with 1+ GPUs; uses min(2, GPUs) processes for ZeRO-3

Run as a script this file is the ZeRO-3 worker.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def worker(out: Path, optimizer: str) -> None:
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import TrainConfig, distributed, unlearn

    tok = char_tokenizer()
    forget, retain, _ = toy_data(tok)
    world = int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=2 * world, per_device_batch=1, warmup_epochs=1,
                      optimizer=optimizer, accelerate="zero3")
    model = unlearn(tiny_llama(tok), tok, get_registry().methods["npo"](), forget, retain, cfg, out_dir=out,
                    save_dir=out / "model")
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "device": str(next(model.model.parameters()).device), "info": model.info,
        "checksum": float(sum(p.double().sum() for p in model.model.parameters())),
        "embed_numel": model.model.model.embed_tokens.weight.numel()}))
    distributed.clean_exit(0)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "paged_adamw_32bit"])
def test_npo_zero3_nccl_bf16(optimizer, tmp_path):
    from harness.io import read_jsonl
    from harness.training.distributed import launch_command

    n = min(2, torch.cuda.device_count())
    script = Path(__file__).resolve()
    cmd, env = launch_command([], "zero3", num_processes=n)
    i = cmd.index("-m", 3)
    cmd = [*cmd[:i], str(script), str(tmp_path), optimizer]
    assert "--mixed_precision" not in cmd  # bf16 from the bundled config on GPUs
    env["PYTHONPATH"] = os.pathsep.join([str(script.parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    assert all(r["device"].startswith("cuda") for r in ranks)
    assert len({r["checksum"] for r in ranks}) == 1 and ranks[0]["embed_numel"] > 0
    assert ranks[0]["info"]["optimizer"] == optimizer
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(2 / 0.1 * math.log(2) + rows[0]["retain"], rel=2e-2)  # bf16 start
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_single_gpu_paged_adamw_step():
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, one_step, tiny_llama

    tok = char_tokenizer()
    result = one_step(get_registry().methods["npo"](), tiny_llama(tok), tok)
    assert math.isfinite(result.loss) and result.changed
    assert next(result.model.parameters()).is_cuda

    from harness.training import TrainConfig, build_optimizer

    opt, name = build_optimizer(tiny_llama(tok).cuda(), TrainConfig())
    assert name == "paged_adamw_32bit" and "Paged" in type(opt).__name__


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
