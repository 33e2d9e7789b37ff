"""GradDiff: gradient ascent on forget plus descent on retain (spec section 3).

loss = gamma * (-CE_mean(forget)) + alpha * retain, where retain is the HF token-mean NLL of the retain
batch ("NLL") or KL(start model || current) over all B*T positions ("KL", needs the frozen start model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import RetainLossType, forward_logits, retain_loss, token_mean_nll
from harness.methods import Method


@dataclass
class GradDiff(Method):
    name: ClassVar[str] = "grad_diff"
    display_name: ClassVar[str] = "GradDiff"
    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss_type: RetainLossType = "NLL"

    def reference_needed(self):
        # Only the KL retain loss needs the frozen start model (its live logits).
        return "model" if self.retain_loss_type == "KL" else "none"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        forget = -token_mean_nll(forward_logits(model, f), f["labels"])
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(GradDiff)
