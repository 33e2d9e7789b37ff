"""GradAscent: maximise the forget-set NLL (spec section 3): loss = -CE_mean(forget), HF token-mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import forward_logits, token_mean_nll
from harness.methods import Method


@dataclass
class GradAscent(Method):
    name: ClassVar[str] = "grad_ascent"
    display_name: ClassVar[str] = "GradAscent"

    def loss(self, model, batch, ref):
        f = batch["forget"]
        forget = -token_mean_nll(forward_logits(model, f), f["labels"])
        return forget, {"forget": forget}


@hookimpl
def register_methods(register):
    register(GradAscent)
