"""WGA, weighted gradient ascent (spec section 3): ascent on the forget tokens, each token's CE weighted by
its own probability to the power beta, the weight detached (no gradient flows through it).

forget = -mean_{valid t} [ p_t^beta * CE_t ],  p_t = exp(-CE_t) (detached),
the mean over every valid (label != -100) token of the micro-batch; retain = HF token-mean NLL
(or KL to the start model, as GradDiff);
loss = gamma * forget + alpha * retain. Published: beta=1, alpha=1, gamma=1, lr 1e-5, 5 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import IGNORE, RetainLossType, forward_logits, retain_loss, token_nll
from harness.methods import Method


@dataclass
class WGA(Method):
    name: ClassVar[str] = "wga"
    display_name: ClassVar[str] = "WGA"
    beta: float = 1.0
    alpha: float = 1.0
    gamma: float = 1.0
    retain_loss_type: RetainLossType = "NLL"

    def reference_needed(self):
        # the KL retain term (as GradDiff's) needs the live frozen start model; the forget term never does
        return "model" if self.retain_loss_type == "KL" else "none"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        ce = token_nll(forward_logits(model, f), f["labels"])
        weight = (-ce.detach()).exp() ** self.beta
        forget = -(weight * ce)[f["labels"][:, 1:] != IGNORE].mean()
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(WGA)
