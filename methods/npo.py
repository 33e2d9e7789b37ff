"""NPO (spec section 3): -(2/beta) mean_i logsigmoid(-beta * (log pi(y_i|x_i) - log pi_ref(y_i|x_i))).

Sequence log-probs are sums over the answer tokens (eos included); the reference is the frozen start
model, whose forget-set log-probs core computes once and reuses. Retain term: NLL (or KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import RetainLossType, forward_logits, npo_loss, retain_loss, sequence_logprob
from harness.methods import Method


@dataclass
class NPO(Method):
    name: ClassVar[str] = "npo"
    display_name: ClassVar[str] = "NPO"
    reference: ClassVar[str] = "logprobs"
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    retain_loss_type: RetainLossType = "NLL"

    def reference_needed(self):
        # With an NLL retain term only reference log-probs are needed; KL needs the live model.
        return "model" if self.retain_loss_type == "KL" else "logprobs"

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        logp = sequence_logprob(forward_logits(model, f), f["labels"])
        forget = npo_loss(logp, ref.sequence_logprob(f, "forget"), self.beta)
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(NPO)
