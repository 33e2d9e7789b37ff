"""Time a full TOFU forget10 evaluation of the tiny model: shared-pass engine vs naive.

naive  = every metric runs its own forward passes (nothing shared between metrics) and batches
         rows in dataset order (as a one-pass-per-metric implementation does);
engine = harness.scoring.evaluate's default: one pass per (model, split, field), shared by every metric
         that reads it, length-sorted batches.

Both score the same metric suite (the task's default suite plus exact memorization and every
MIA attack) against the tiny retain90 model; the retain model is scored once beforehand (it is
cached by content hash in normal use), so both timings cover the evaluated model only.
The script also checks that both give the same numbers.

    python benchmarks/eval_speed.py [--limit N] [--batch-size 32] [--suite default|all]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

EXTRA = ["exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm",
         "mia_reference"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tofu_forget10")
    ap.add_argument("--limit", type=int, default=None, help="first N rows of each split (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--suite", choices=["default", "all"], default="all")
    args = ap.parse_args()

    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import TINY_TEMPLATE, tiny_model_dir
    from harness.plugins import get_registry
    from harness.scoring.evaluate import evaluate_task
    from harness.scoring.reference import Reference, resolve_reference

    reg = get_registry()
    task = reg.tasks[args.task]
    split = args.task.split("forget")[-1]
    target, retain = tiny_model_dir("full"), tiny_model_dir(f"retain{100 - int(split)}")
    tok = load_tokenizer(str(target))
    model = load_model(str(target))
    metrics = [n for n, _ in task.metrics] + (EXTRA if args.suite == "all" else [])

    from harness.scoring.context import EvalContext

    # score the reference once (as its cache would), shared by both timed runs
    ctx = EvalContext(task, model, tok, TINY_TEMPLATE, batch_size=args.batch_size, limit=args.limit,
                      progress=False, registry=reg, reference_options={"dtype": "float32"})
    ref: Reference = resolve_reference(str(retain), ctx)
    for key in ("forget_truth_ratio", "mia_min_k"):
        ref.entry(key)
    ref.load_model()

    def run(share: bool, sort: bool):
        t = time.perf_counter()
        scores = evaluate_task(task, model, tok, TINY_TEMPLATE, reference=ref, batch_size=args.batch_size,
                               limit=args.limit, metrics=metrics, progress=False, registry=reg,
                               share=share, sort=sort)
        return time.perf_counter() - t, scores

    t_naive, s_naive = run(share=False, sort=False)
    t_engine, s_engine = run(share=True, sort=True)
    worst = 0.0
    for name, s in s_engine.items():
        a, b = s.value, s_naive[name].value
        if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
            worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-30))
    rows = args.limit or "all"
    print(f"{args.task} ({args.suite} suite, {len(s_engine)} metrics incl. dependencies, rows per split: {rows}, "
          f"batch {args.batch_size})")
    print(f"naive  (one pass per metric, dataset order): {t_naive:8.1f} s")
    print(f"engine (shared passes, length-sorted)      : {t_engine:8.1f} s")
    print(f"speed-up: {t_naive / t_engine:.2f}x   largest relative difference between the two: {worst:.2e}")


if __name__ == "__main__":
    main()
