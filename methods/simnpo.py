"""SimNPO (spec section 3): reference-free, length-normalised NPO.

forget = -(2/beta) mean_i logsigmoid(beta * (NLL_sum_i / n_i - delta)), retain = HF token-mean NLL;
loss = gamma * forget + alpha * retain with the published defaults delta=0, beta=4.5, alpha=1,
gamma=0.125. (beta multiplies delta, so this delta is the SimNPO paper's gamma / beta.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import forward_logits, retain_loss, simnpo_loss
from harness.methods import Method


@dataclass
class SimNPO(Method):
    name: ClassVar[str] = "simnpo"
    display_name: ClassVar[str] = "SimNPO"
    delta: float = 0.0
    beta: float = 4.5
    alpha: float = 1.0
    gamma: float = 0.125

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        forget = simnpo_loss(forward_logits(model, f), f["labels"], self.beta, self.delta)
        retain = retain_loss(model, r, ref)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(SimNPO)
