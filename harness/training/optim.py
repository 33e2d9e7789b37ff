"""AdamW with HF's weight-decay groups and the learning-rate schedule (spec 4.1)."""

from __future__ import annotations

import re

import torch

from harness import HarnessError
from harness.training import adapters
from harness.training.config import TrainConfig


def _decay_parameter_names(model) -> set[str]:
    """Parameters that get weight decay: everything but biases and norm weights (HF Trainer's rule)."""
    no_decay = set()
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or "bias" in p_name:
                no_decay.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return {n for n, _ in model.named_parameters() if n not in no_decay}


def select_trainable(model, patterns: list[str], *, what: str = "trainable_params") -> set[str]:
    """Names of the parameters that full-match any of ``patterns``; a pattern matching none is an error
    naming it and a few parameter names."""
    adapted = adapters.is_adapted(model)
    # with an adapter, a pattern names base weights and selects the adapter weights on them (RMU + LoRA)
    names = [n for n, p in model.named_parameters() if p.requires_grad or not adapted]
    as_base = {n: adapters.base_name(n) if adapted else n for n in names}
    selected: set[str] = set()
    for pat in patterns:
        try:
            hits = {n for n in names if re.fullmatch(pat, as_base[n])}
        except re.error as exc:
            raise HarnessError(f"{what} regex {pat!r} is not a valid regular expression: {exc}") from None
        if not hits:
            base = list(dict.fromkeys(as_base.values()))
            shown = ", ".join(base[:3] + (["..."] if len(base) > 4 else []) + base[-1:])
            raise HarnessError(f"{what} regex {pat!r} full-matches no parameter of the model; its parameters "
                               f"are named like: {shown}")
        selected |= hits
    return selected


# --optimizer name -> bitsandbytes class (CUDA)
BNB = {"paged_adamw_32bit": "PagedAdamW32bit", "adamw_32bit": "AdamW32bit", "adamw_8bit": "AdamW8bit",
       "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model, cfg: TrainConfig, only: set[str] | None = None) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over the trainable parameters with HF's weight-decay groups; returns (optimizer, resolved name).

    ``only``: parameter names (``select_trainable``) that alone go to the optimizer; the others keep
    ``requires_grad`` (gradients are computed everywhere, as the reference's RMU does) but are never updated.

    ``paged_adamw_32bit`` is bitsandbytes' paged AdamW on CUDA; ``adamw_8bit`` / ``paged_adamw_8bit`` its
    8-bit-state AdamW (2 bytes of optimizer state per parameter instead of 8). On CPU paging does not exist
    and bitsandbytes' 32-bit AdamW equals torch's AdamW to 4e-8, so torch's (faster on CPU) is used for
    every bitsandbytes name and the resolved name says so (recorded in config.yaml).
    """
    decay = _decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (only is None or n in only)]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    on_cuda = any(p.is_cuda for _, p in named) or torch.cuda.is_available()
    kwargs = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer in BNB and on_cuda:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB[cfg.optimizer])(groups, **kwargs), cfg.optimizer
    resolved = "adamw_torch" if cfg.optimizer == "adamw_torch" else f"adamw_torch (for {cfg.optimizer} on CPU)"
    return torch.optim.AdamW(groups, **kwargs), resolved


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    if cfg.schedule == "linear":
        name = "linear"
    else:
        name = "constant_with_warmup" if warmup_steps > 0 else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
