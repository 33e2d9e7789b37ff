"""GradDiff: gradient ascent on forget plus descent on retain (spec section 3).

loss = gamma * (-CE_mean(forget)) + alpha * retain, where retain is the HF token-mean NLL of the retain
batch ("NLL") or KL(start model || current) over all B*T positions ("KL", needs the frozen start model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import check_retain_loss_type, forward_logits, retain_loss, token_mean_nll
from harness.methods import Method


@dataclass
class GradDiff(Method):
    name: ClassVar[str] = "grad_diff"
    display_name: ClassVar[str] = "GradDiff"
    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss_type: str = "NLL"

    def __post_init__(self):
        check_retain_loss_type("grad_diff", self.retain_loss_type)
        # Only the KL retain loss needs the frozen start model.
        self.needs_reference = self.retain_loss_type == "KL"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        forget = -token_mean_nll(forward_logits(model, f), f["labels"])
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(GradDiff)
