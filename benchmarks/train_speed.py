"""Time NPO on the embedded tiny model with and without cached reference log-probs.

    python benchmarks/train_speed.py [--size test|default] [--split forget01] [--epochs 10] [--repeats 1] [--threads 1]

Caching computes the frozen start model's forget-set log-probs once before training instead of one
reference forward per micro-batch; both paths must give the same losses (checked here too).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=os.environ.get("HARNESS_TINY_SIZE", "default"), choices=["test", "default"])
    ap.add_argument("--split", default="forget01", choices=["forget01", "forget05", "forget10"])
    ap.add_argument("--epochs", type=int, default=10, help="published unlearning runs use 10")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is steadiest on a busy CPU)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from harness.data.encode import encode_qa
    from harness.data.splits import load_split
    from harness.io import read_jsonl
    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import TINY_TEMPLATE, tiny_model_dir
    from harness.plugins import get_registry
    from harness.tasks import DataSpec
    from harness.training import TrainConfig, unlearn

    retain_split = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}[args.split]
    start = tiny_model_dir("full", size=args.size)
    tok = load_tokenizer(str(start))

    def items(name, limit=None):
        rows = load_split(DataSpec(path="locuslab/TOFU", name=name, split="train"))[:limit]
        return [encode_qa(tok, TINY_TEMPLATE, r["question"], r["answer"]) for r in rows]

    forget, retain = items(args.split), items(retain_split, 400)
    npo = get_registry().methods["npo"]()
    cfg = TrainConfig(epochs=args.epochs, lr=5e-4, batch_size=args.batch_size, per_device_batch=args.per_device_batch,
                      warmup_epochs=1, optimizer="adamw_torch")
    times: dict[bool, list[float]] = {True: [], False: []}
    logs = {}
    for _ in range(args.repeats):
        for cache in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                model = load_model(str(start))
                t0 = time.perf_counter()
                out = unlearn(model, tok, npo, forget, retain, cfg, out_dir=Path(tmp), cache_reference=cache,
                              desc=f"npo cache={cache}")
                times[cache].append(time.perf_counter() - t0)
                logs[cache] = read_jsonl(Path(tmp) / "train_log.jsonl")
                forwards = out.info["reference_forwards"]
            print(f"cache_reference={cache!s:5}  {times[cache][-1]:7.2f} s  reference forwards: {forwards}")
    worst = max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in zip(logs[True], logs[False]))
    best = {k: min(v) for k, v in times.items()}
    print(f"\nNPO on tiny ({args.size}) {args.split}: {len(forget)} forget items, {cfg.epochs} epochs, "
          f"{len(logs[True])} optimizer steps")
    print(f"recompute {best[False]:.2f} s, cached {best[True]:.2f} s, speed-up x{best[False] / best[True]:.2f}; "
          f"max relative loss difference {worst:.1e}")


if __name__ == "__main__":
    main()
