"""SatImp (spec section 3): ascent on the forget tokens, each token's CE weighted by p^beta1 (1-p)^beta2,
the weight detached, so well-remembered but not saturated tokens are pushed hardest.

forget = -mean_{valid t} [ p_t^beta1 * (1 - p_t)^beta2 * CE_t ],  p_t = exp(-CE_t) (detached),
the mean over every valid token of the micro-batch; retain = HF token-mean NLL (or KL, as GradDiff);
loss = gamma * forget + alpha * retain.

Defaults are the reference's SatImp.yaml, which the published experiments use: beta1=5, beta2=1,
alpha=1.0, gamma=0.1. (The reference class's own defaults are the reverse, gamma=1, alpha=0.1; they
apply only when no yaml sets them, which no published run does.) Published: lr 1e-5, 5 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import IGNORE, RetainLossType, forward_logits, retain_loss, token_nll
from harness.methods import Method


@dataclass
class SatImp(Method):
    name: ClassVar[str] = "satimp"
    display_name: ClassVar[str] = "SatImp"
    beta1: float = 5.0
    beta2: float = 1.0
    alpha: float = 1.0
    gamma: float = 0.1
    retain_loss_type: RetainLossType = "NLL"

    def reference_needed(self):
        # the KL retain term (as GradDiff's) needs the live frozen start model; the forget term never does
        return "model" if self.retain_loss_type == "KL" else "none"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        ce = token_nll(forward_logits(model, f), f["labels"])
        p = (-ce.detach()).exp()
        weight = p ** self.beta1 * (1 - p) ** self.beta2
        forget = -(weight * ce)[f["labels"][:, 1:] != IGNORE].mean()
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(SatImp)
