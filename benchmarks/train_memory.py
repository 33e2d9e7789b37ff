"""Peak memory of one NPO training step: full finetuning vs LoRA vs LoRA with the reference through the
disabled adapter, measured; then the same budget computed from parameter counts for real Llama sizes.

    python benchmarks/train_memory.py [--model DIR] [--hidden H --layers L] [--steps 1] [--device cpu|cuda]

Each setting runs in a fresh process (one optimizer step of NPO with a live reference, as KL-retain and
IdkDPO keep it): on CPU the peak resident set size (ru_maxrss) above what the process held before the
model was loaded, on CUDA ``torch.cuda.max_memory_allocated``. Default model: the embedded tiny TOFU
target (``HARNESS_TINY_SIZE`` picks its size); ``--hidden/--layers`` builds a random Llama of that shape
instead, large enough for the differences to stand out of the allocator's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SETTINGS = {
    "full": "full finetuning, reference = a frozen copy",
    "lora+copy": "LoRA, reference = a separately loaded frozen copy",
    "lora": "LoRA, reference = the same model with the adapter disabled",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(setting: str, args) -> dict:
    import copy

    import torch

    from harness.plugins import get_registry
    from harness.testing import tiny_llama, toy_data
    from harness.training import TrainConfig, unlearn
    from harness.training.adapters import peft_settings

    cuda = args.device == "cuda"
    if args.hidden:
        from harness.testing import char_tokenizer

        tok = char_tokenizer()
        make = lambda: tiny_llama(tok, hidden=args.hidden, layers=args.layers)  # noqa: E731
    else:
        from harness.models.load import load_model, load_tokenizer
        from harness.models.tiny import tiny_model_dir

        path = args.model or str(tiny_model_dir("full"))
        tok = load_tokenizer(path)
        make = lambda: load_model(path)  # noqa: E731
    forget, retain, _ = toy_data(tok)
    cfg = TrainConfig(epochs=args.steps, lr=1e-4, batch_size=4, per_device_batch=4, warmup_epochs=0,
                      optimizer="adamw_torch", peft=peft_settings("lora") if setting.startswith("lora") else None)
    npo = get_registry().methods["npo"]()
    # the same step on a minute model first: libraries imported and initialised lazily are not the step's memory
    from harness.testing import char_tokenizer

    small_tok = char_tokenizer()
    small = tiny_llama(small_tok, hidden=8, layers=1)
    unlearn(small, small_tok, npo, *toy_data(small_tok)[:2], cfg, cache_reference=False,
            ref_model=copy.deepcopy(small) if setting == "lora+copy" else None)
    base_rss = _rss_mb()
    model = make()
    if cuda:
        model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    n_params = sum(p.numel() for p in model.parameters())
    ref = copy.deepcopy(model) if setting == "lora+copy" else None
    result = unlearn(model, tok, npo, forget, retain, cfg, ref_model=ref, cache_reference=False)
    out = {"setting": setting, "parameters": n_params, "trainable": result.info["trainable_parameters"],
           "reference": result.info.get("reference_source"),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss}
    out["step_peak_mb"] = out["peak_rss_mb"] - base_rss
    if cuda:
        out["step_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


# ---------------------------------------------------------------------------------- parameter counts
ARCHS = {  # config.json of each release: vocab, hidden, intermediate, layers, heads, kv heads, tied
    "Llama-3.2-1B": dict(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv=8, tied=True),
    "Llama-2-7B": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, tied=False),
    "Llama-3.1-8B": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv=8, tied=False),
}


def counts(a: dict, r: int = 16) -> dict:
    """Parameters of a Llama architecture: linear (quantizable) and the rest, and LoRA's on every linear."""
    h, kv = a["hidden"], a["hidden"] // a["heads"] * a["kv"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, a["inter"]), (h, a["inter"]), (a["inter"], h)]
    linear = a["layers"] * sum(i * o for i, o in shapes)
    embed = a["vocab"] * h * (1 if a["tied"] else 2)
    norms = a["layers"] * 2 * h + h
    lora = a["layers"] * sum(r * (i + o) for i, o in shapes)
    return {"total": linear + embed + norms, "linear": linear, "other": embed + norms, "lora": lora}


def budget(c: dict) -> list[tuple]:
    """(setting, weights, gradients, optimizer state, reference copy) in bytes, single GPU as the harness
    trains: bf16 weights and gradients; bitsandbytes AdamW 32-bit keeps 8 B/param of state, 8-bit 2 B;
    peft keeps adapter weights in fp32 (4 B, grads 4 B, AdamW 8 B); QLoRA: nf4 linears (0.5 B plus
    ~0.0625 B of double-quantized constants), embeddings, lm_head and norms in bf16."""
    n, lora = c["total"], c["lora"]
    nf4 = c["linear"] * (0.5 + 0.0625) + c["other"] * 2
    return [
        ("full, paged_adamw_32bit", 2 * n, 2 * n, 8 * n, 2 * n),
        ("full, adamw_8bit", 2 * n, 2 * n, 2 * n, 2 * n),
        ("LoRA r=16, reference copy", 2 * n + 4 * lora, 4 * lora, 8 * lora, 2 * n),
        ("LoRA r=16, disabled adapter", 2 * n + 4 * lora, 4 * lora, 8 * lora, 0),
        ("QLoRA r=16, disabled adapter", nf4 + 4 * lora, 4 * lora, 8 * lora, 0),
    ]


def table() -> str:
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    lines = ["| model | params | LoRA params | setting | weights GB | grads GB | optimizer GB | reference GB | total GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, arch in ARCHS.items():
        c = counts(arch)
        for setting, w, g, o, ref in budget(c):
            lines.append(f"| {name} | {c['total'] / 1e9:.2f}B | {c['lora'] / 1e6:.1f}M | {setting} | {gb(w)} | {gb(g)} "
                         f"| {gb(o)} | {gb(ref)} | {gb(w + g + o + ref)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint directory (default: the embedded tiny TOFU target)")
    ap.add_argument("--hidden", type=int, help="build a random Llama of this hidden size instead")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1, help="epochs of the 4-example toy forget set (1 step each)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    rows = []
    for setting in SETTINGS:
        cmd = [sys.executable, __file__, "--one", setting, "--layers", str(args.layers), "--steps", str(args.steps),
               "--device", args.device]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--hidden", str(args.hidden)] if args.hidden else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{setting} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    what = "CUDA max allocated" if args.device == "cuda" else "CPU peak RSS above the pre-load baseline"
    print(f"one NPO step ({rows[0]['parameters'] / 1e6:.2f}M-parameter model, {what}):")
    print("| setting | trainable | reference | step peak MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {SETTINGS[r['setting']]} | {r['trainable']:,} | {r['reference']} | {r['step_peak_mb']:.1f} |")
    print()
    print("computed from parameter counts (bytes x parameters; activations not included):")
    print(table())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
