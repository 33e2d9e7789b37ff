"""AdamW with HF's weight-decay groups and the learning-rate schedule (spec 4.1)."""

from __future__ import annotations

import re

import torch

from harness import HarnessError
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
    names = [n for n, _ in model.named_parameters()]
    selected: set[str] = set()
    for pat in patterns:
        try:
            hits = {n for n in names if re.fullmatch(pat, n)}
        except re.error as exc:
            raise HarnessError(f"{what} regex {pat!r} is not a valid regular expression: {exc}") from None
        if not hits:
            shown = ", ".join(names[:3] + (["..."] if len(names) > 4 else []) + names[-1:])
            raise HarnessError(f"{what} regex {pat!r} full-matches no parameter of the model; its parameters "
                               f"are named like: {shown}")
        selected |= hits
    return selected


def build_optimizer(model, cfg: TrainConfig, only: set[str] | None = None) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over the trainable parameters with HF's weight-decay groups; returns (optimizer, resolved name).

    ``only``: parameter names (``select_trainable``) that alone go to the optimizer; the others keep
    ``requires_grad`` (gradients are computed everywhere, as the reference's RMU does) but are never updated.

    ``paged_adamw_32bit`` is bitsandbytes' paged AdamW on CUDA. On CPU paging does not exist and
    bitsandbytes' 32-bit AdamW equals torch's AdamW to 4e-8, so torch's (faster on CPU) is used and the
    resolved name says so.
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
    if cfg.optimizer in ("paged_adamw_32bit", "adamw_32bit") and on_cuda:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW32bit if cfg.optimizer == "paged_adamw_32bit" else bnb.optim.AdamW32bit
        return cls(groups, **kwargs), cfg.optimizer
    resolved = "adamw_torch" if cfg.optimizer == "adamw_torch" else f"adamw_torch (for {cfg.optimizer} on CPU)"
    return torch.optim.AdamW(groups, **kwargs), resolved


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    if cfg.schedule == "linear":
        name = "linear"
    else:
        name = "constant_with_warmup" if warmup_steps > 0 else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
