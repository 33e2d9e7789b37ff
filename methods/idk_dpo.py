"""IdkDPO (spec section 3): DPO with an "I don't know" answer preferred over the original forget answer.

forget = -(2/beta) mean_i logsigmoid(beta * ((log pi(idk) - log pi_ref(idk)) - (log pi(y) - log pi_ref(y))))
(the reference code's 2/beta factor); sequence log-probs are sums over answer tokens. Core draws one idk
answer per forget example at each access; reference log-probs are memoised per (example, idk answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import RetainLossType, dpo_loss, forward_logits, retain_loss, sequence_logprob
from harness.methods import Method


@dataclass
class IdkDPO(Method):
    name: ClassVar[str] = "idk_dpo"
    display_name: ClassVar[str] = "IdkDPO"
    reference: ClassVar[str] = "logprobs"
    uses_idk: ClassVar[bool] = True
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    retain_loss_type: RetainLossType = "NLL"

    def reference_needed(self):
        # With an NLL retain term only reference log-probs are needed; KL needs the live model.
        return "model" if self.retain_loss_type == "KL" else "logprobs"

    def loss(self, model, batch, ref):
        f, w, r = batch["forget"], batch["idk"], batch["retain"]
        lose = sequence_logprob(forward_logits(model, f), f["labels"])
        win = sequence_logprob(forward_logits(model, w), w["labels"])
        forget = dpo_loss(win, ref.sequence_logprob(w, "idk"), lose, ref.sequence_logprob(f, "forget"), self.beta)
        retain = retain_loss(model, r, ref, self.retain_loss_type)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(IdkDPO)
