"""Where scoring time goes: one task's evaluation of the tiny model, broken down per primitive.

Prints, for the shared-pass engine (the default of ``harness eval``) and optionally the naive mode
(a model of the reference evaluator, below), the time of model loading, data loading, tokenisation,
each teacher-forced pass and each generation per source, GradNorm, the reference (retain model)
scoring when it is re-scored, and the rest (metric math, ROUGE); tokens processed and tokens per
second per primitive; and the peak resident memory of the process. With ``--repeat N`` every figure
is the minimum over N runs (the machine is shared: the minimum is the least disturbed). Both modes
must give the same numbers; the script prints the largest relative difference.

    python benchmarks/eval_speed.py --task tofu_forget05 --mode both --clock cpu --threads 1 --repeat 2
    python benchmarks/eval_speed.py --task muse_news --mode engine

The naive mode models open-unlearning's evaluator (spec sections 5-6): every metric runs its own
passes and generations on its own tokenisation of its data (results are shared only by metric
name, as the reference's ``pre_compute`` cache does: forget_quality reads the forget_truth_ratio
just computed, model_utility computes its nine sub-metrics); dataset-order batches of the
reference's batch size padded to their longest row (TOFU 32; MUSE knowmem 16, verbmem, privleak and
extraction strength 8); option sets one padded batch per answer slot; the lm head at every
position and one fp32 log-softmax over the whole (B, T, V) logits per pass; plain ``generate`` per
batch. As in the reference (``retain_logs_path``), the retain model's values are read from its
scores, computed once beforehand and not timed; ``--reference-rescored`` times them in every run.
Run one task per process: peak memory is the process's.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

CLOCK = "cpu"  # set by --clock
EXTRA = ["exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm",
         "mia_reference"]


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def breakdown(timings: list[dict]) -> dict[tuple, dict]:
    """Sum the context's timing entries per (model, primitive, source)."""
    out: dict[tuple, dict] = defaultdict(lambda: {"seconds": 0.0, "rows": 0, "tokens": 0, "new_tokens": 0})
    clock = "cpu" if CLOCK == "cpu" else "seconds"
    for e in timings:
        what = e["what"]
        # MIA sources are the privleak / MIA splits; name them so the table reads per metric family
        k = (e["model"], what, e["source"])
        d = out[k]
        d["seconds"] += e[clock]
        d["rows"] += e.get("rows", 0)
        d["tokens"] += e.get("tokens", 0)
        d["new_tokens"] += e.get("new_tokens", 0)
    return dict(out)


# the reference's eval batch sizes where they differ from 32 (spec 6.4): MUSE forward passes 8,
# knowmem generation (32 new tokens) 16, verbmem generation 8
NAIVE_BATCH = {"MUSE": {"forward": 8, "generate": {32: 16}, "generate_default": 8}}


@contextmanager
def patched(args, task, naive: bool):
    """The naive mode's batch sizes; the engine variants of --generate / --need."""
    from harness.scoring import primitives as P

    saved = {k: getattr(P, k) for k in ("forward_stats", "forward_stats_shared", "generate")}
    fs, fss, gen = saved["forward_stats"], saved["forward_stats_shared"], saved["generate"]
    sizes = NAIVE_BATCH.get(task.benchmark) if naive else None
    try:
        if sizes:
            P.forward_stats = lambda *a, **kw: fs(*a, **{**kw, "batch_size": sizes["forward"]})
            P.generate = lambda *a, **kw: gen(*a, **{**kw, "batch_size": sizes["generate"].get(
                kw.get("max_new_tokens"), sizes["generate_default"])})
        if not naive and args.need == "all":
            P.forward_stats = lambda *a, **kw: fs(*a, **{**kw, "need": "z"})
            P.forward_stats_shared = lambda *a, **kw: fss(*a, **{**kw, "need": "z"})
        if not naive and args.generate == "plain":
            P.generate = lambda *a, **kw: gen(*a, **{**kw, "drop_finished": False, "budget": None})
        yield
    finally:
        for k, v in saved.items():
            setattr(P, k, v)


def run_once(task, model, tok, template, metrics, ref_spec, args, reg, *, share: bool, sort: bool,
             reference_cached):
    from harness.scoring.context import EvalContext
    from harness.scoring.evaluate import evaluate_task
    from harness.scoring.reference import resolve_reference

    timings: list[dict] = []
    ref = reference_cached
    if ref is None and ref_spec is not None:
        ctx = EvalContext(task, model, tok, template, batch_size=args.batch_size, limit=args.limit,
                          progress=False, registry=reg, reference_options={"dtype": "float32"},
                          timings=timings)
        ref = resolve_reference(ref_spec, ctx)
        ref.logs = {}  # recompute: the reference's scoring is part of what is measured
        ref.path = Path(tempfile.mkdtemp()) / "EVAL.json"
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    with patched(args, task, naive=not share):
        t = clock()
        scores = evaluate_task(task, model, tok, template, reference=ref, batch_size=args.batch_size,
                               limit=args.limit, metrics=metrics, progress=False, registry=reg, share=share,
                               sort=sort, timings=timings, shared_prefix=share and args.shared_prefix == "on")
        total = clock() - t
    return total, scores, timings


def print_table(title: str, total: float, table: dict[tuple, dict], model_load: float) -> None:
    print(f"\n{title}: {total:.2f} {CLOCK} s scoring (+ {model_load:.2f} {CLOCK} s model load)")
    print(f"  {'model':<10} {'primitive':<9} {'source':<52} {'s':>7} {'share':>6} {'rows':>5} "
          f"{'tokens':>8} {'tok/s':>8}")
    accounted = 0.0
    for (who, what, src), d in sorted(table.items(), key=lambda kv: -kv[1]["seconds"]):
        toks = d["tokens"] + d["new_tokens"]
        rate = toks / d["seconds"] if d["seconds"] > 0 and toks else float("nan")
        accounted += d["seconds"]
        print(f"  {who:<10} {what:<9} {src[:52]:<52} {d['seconds']:7.2f} {d['seconds'] / total:6.1%} "
              f"{d['rows']:5d} {toks:8d} {rate:8.0f}")
    print(f"  {'':<10} {'other':<9} {'metric math, ROUGE, reference files':<52} {total - accounted:7.2f} "
          f"{(total - accounted) / total:6.1%}")
    print(f"  {'':<10} {'load':<9} {'model + tokenizer (once per process, not in the total)':<52} {model_load:7.2f}")


def min_tables(runs: list[tuple[float, dict]]) -> tuple[float, dict]:
    """Per key, the minimum over runs (the least disturbed figure on a shared machine)."""
    total = min(r[0] for r in runs)
    out = {}
    for k in runs[0][1]:
        best = min((r[1][k] for r in runs if k in r[1]), key=lambda d: d["seconds"])
        out[k] = best
    return total, out


def worst_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for name, s in a.items():
        x, y = s.value, b[name].value
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y)):
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-30))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tofu_forget05")
    ap.add_argument("--limit", type=int, default=None, help="first N rows of each split (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--suite", choices=["default", "all"], default="default",
                    help="default: the task's metric suite; all: plus exact memorization and every MIA attack")
    ap.add_argument("--mode", choices=["engine", "naive", "both"], default="engine")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode; figures are the minimum")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU seconds (default; least disturbed by other processes on a shared "
                         "machine); wall: elapsed seconds")
    ap.add_argument("--shared-prefix", choices=["on", "off"], default="on",
                    help="compute the shared question prefix of option sets once (default on)")
    ap.add_argument("--reference-rescored", action="store_true",
                    help="re-score the retain model inside every run (default: scored once beforehand and read, "
                         "as the reference reads retain_logs_path)")
    ap.add_argument("--generate", choices=["drop", "plain"], default="drop",
                    help="engine generation: drop finished rows in batches by position budget (default), or plain "
                         "model.generate in batches of --batch-size")
    ap.add_argument("--need", choices=["auto", "all"], default="auto",
                    help="engine passes: compute only the fields their readers need (default) or all (lp, hit, z)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock

    import torch

    torch.set_num_threads(args.threads)
    from harness.models.load import load_model, load_tokenizer
    from harness.models.profiles import finalize_template, resolve_model
    from harness.plugins import get_registry

    reg = get_registry()
    task = reg.tasks[args.task]
    choice = resolve_model("tiny", task, template_file=None, reference=None, retain=False)
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    t = clock()
    tok = load_tokenizer(choice.tokenizer_path())
    model = load_model(choice.start_path(), dtype=choice.load_dtype())
    model_load = clock() - t
    template = finalize_template(choice, tok)
    metrics = [n for n, _ in task.metrics] + (EXTRA if args.suite == "all" else [])
    ref_spec = choice.reference

    cached = None
    if not args.reference_rescored and ref_spec is not None:
        from harness.scoring.context import EvalContext
        from harness.scoring.reference import resolve_reference

        ctx = EvalContext(task, model, tok, template, batch_size=args.batch_size, limit=args.limit,
                          progress=False, registry=reg, reference_options={"dtype": "float32"})
        cached = resolve_reference(ref_spec, ctx)
        for key in ("forget_truth_ratio", "mia_min_k"):
            if key in reg.metrics and (key != "forget_truth_ratio" or task.benchmark == "TOFU"):
                cached.entry(key)

    modes = {"engine": [(True, True)], "naive": [(False, False)], "both": [(False, False), (True, True)]}[args.mode]
    # the modes alternate (naive, engine, naive, engine, ...): on a shared or throttled machine the speed of
    # the CPU drifts by tens of percent within minutes, and both modes of one round see the same drift
    runs: dict[str, list] = {}
    scores: dict[str, dict] = {}
    for _ in range(args.repeat):
        for share, sort in modes:
            name = "engine" if share else "naive"
            total, scores[name], timings = run_once(task, model, tok, template, metrics, ref_spec, args, reg,
                                                    share=share, sort=sort, reference_cached=cached)
            runs.setdefault(name, []).append((total, breakdown(timings)))
    results = {name: (min_tables(r), scores[name]) for name, r in runs.items()}
    rows = args.limit or "all"
    n_metrics = len(next(iter(results.values()))[1])
    print(f"{args.task} ({args.suite} suite, {n_metrics} metrics incl. dependencies, rows per split: {rows}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), min of {args.repeat} run(s), "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {CLOCK} clock, engine: "
          f"generate {args.generate}, need {args.need}, shared prefix {args.shared_prefix}; reference "
          f"{'re-scored' if args.reference_rescored else 'read'}; load average {os.getloadavg()[0]:.1f})")
    for name, ((total, table), _) in results.items():
        print_table(name, total, table, model_load)
    if len(results) == 2:
        (tn, _), sn = results["naive"]
        (te, _), se = results["engine"]
        rounds = [a[0] / b[0] for a, b in zip(runs["naive"], runs["engine"])]
        print(f"\nspeed-up engine vs naive: {tn / te:.2f}x (minimum over the runs of each mode; per round: "
              f"{', '.join(f'{r:.2f}x' for r in rounds)})   largest relative difference: {worst_difference(se, sn):.2e}")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
