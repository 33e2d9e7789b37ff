"""MaxEnt: maximum-entropy forgetting with a GradDiff retain term. At every forget answer position the
model is pushed towards the uniform distribution over the vocabulary (it stops preferring any token),
while the retain answers keep their likelihood.

    H_t    = -sum_v p_t(v) log p_t(v),   p_t = softmax(logits_t)   (the prediction of answer token t)
    forget = -(1/N) * sum_t H_t          (N: the answer tokens of the micro-batch)
    loss   = gamma * forget + alpha * NLL_mean(retain)

Equivalently forget = mean_t KL(p_t || uniform) - log V: minimising it maximises the entropy. Unlike
gradient ascent the forget term is bounded (it cannot go below -log V), so it does not diverge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import HarnessError, hookimpl
from harness.losses import IGNORE, forward_logits, token_mean_nll
from harness.methods import Method

__version__ = "0.1.0"


@dataclass
class MaxEnt(Method):
    """Hyper-parameters are the dataclass fields: ``harness run -m maxent --set maxent.gamma=0.5``."""

    name: ClassVar[str] = "maxent"
    display_name: ClassVar[str] = "MaxEnt"
    needs_reference: ClassVar[bool] = False  # no frozen start model
    gamma: float = 1.0
    alpha: float = 1.0

    def __post_init__(self):
        if self.gamma < 0:
            raise HarnessError(f"maxent.gamma must be >= 0, got {self.gamma}")

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        logp = forward_logits(model, f)[:, :-1].log_softmax(-1)  # position t predicts label t+1
        entropy = -(logp.exp() * logp).sum(-1)
        forget = -entropy[f["labels"][:, 1:] != IGNORE].mean()
        retain = token_mean_nll(forward_logits(model, r), r["labels"])
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(MaxEnt)
