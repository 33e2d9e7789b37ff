"""Tiny TOFU models for the embedded ``tiny`` profile (kinds ``retain99/95/90`` and ``full``).

To stay within minutes on CPU the retain model is trained first and the target continues it on
``full``: the retain model never sees the forget split.
"""

from __future__ import annotations

import logging

from harness.models.tiny.build import TinySize, finetune_rows, tofu_rows

log = logging.getLogger("harness")

RETAIN_KINDS = ("retain99", "retain95", "retain90")


def _retain_rows(split: str, size: TinySize) -> list[dict]:
    rows = tofu_rows(split)
    return rows if size.retain_rows is None else rows[: size.retain_rows]


def _recipe(kind: str, size: TinySize) -> tuple[str, list[dict], int]:
    """(parent kind, training rows, epochs) of a TOFU kind."""
    if kind in RETAIN_KINDS:
        return "base", _retain_rows(kind, size), size.retain_epochs
    # full continues the retain99 model (test size: the retain subset plus forget10, which contains
    # forget01/05, so every split has a target that saw its forget set)
    rows = tofu_rows("full") if size.retain_rows is None else _retain_rows("retain99", size) + tofu_rows("forget10")
    return "retain99", rows, size.full_epochs


def _builder(kind: str):
    def build(size: TinySize, parent_dir):
        import torch

        from harness.models.load import load_model, load_tokenizer

        parent, rows, epochs = _recipe(kind, size)
        pdir = parent_dir(parent)
        tok = load_tokenizer(str(pdir))
        model = load_model(str(pdir))
        torch.manual_seed(size.seed)
        log.info("finetuning tiny '%s' from '%s' on %d rows for %d epoch(s)", kind, parent, len(rows), epochs)
        return finetune_rows(model, tok, rows, epochs, size, desc=f"tiny {kind}"), tok

    build.recipe_version = None  # TOFU kinds are versioned by BUILD_VERSION alone
    return build


KINDS = {kind: _builder(kind) for kind in (*RETAIN_KINDS, "full")}
