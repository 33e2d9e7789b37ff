"""GradDiff: gradient ascent on forget plus descent on retain (spec section 3).

loss = gamma * (-CE_mean(forget)) + alpha * retain, where retain is the HF token-mean NLL of the retain
batch ("NLL") or KL(start model || current) over all B*T positions ("KL", needs the frozen start model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import HarnessError, hookimpl
from harness.losses import forward_logits, kl_retain, token_mean_nll
from harness.methods import Method


@dataclass
class GradDiff(Method):
    name: ClassVar[str] = "grad_diff"
    display_name: ClassVar[str] = "GradDiff"
    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss_type: str = "NLL"

    def __post_init__(self):
        if self.retain_loss_type not in ("NLL", "KL"):
            raise HarnessError(f"grad_diff.retain_loss_type must be NLL or KL, got {self.retain_loss_type!r}")
        # Only the KL retain loss needs the frozen start model.
        self.needs_reference = self.retain_loss_type == "KL"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        forget = -token_mean_nll(forward_logits(model, f), f["labels"])
        logits = forward_logits(model, r)
        retain = kl_retain(logits, ref.logits(r)) if self.retain_loss_type == "KL" else token_mean_nll(logits, r["labels"])
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(GradDiff)
