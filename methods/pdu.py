"""PDU (spec section 3): primal-dual unlearning, logit-margin flattening on forget under a retain constraint.

forget = mean over positions t whose UNSHIFTED label is not -100 of (max_v logit_t(v) - mean_v logit_t(v))^2
         (the logits at the answer positions: eos included, the last prompt position excluded)
loss   = gamma * forget + alpha * (NLL(retain) - retain_loss_eps)
dual   : alpha <- max(0, alpha + dual_step_size * (NLL(retain) - retain_loss_eps)), logged per step as
         retain_preference, from epoch dual_warmup_epochs on (0-based; at once when it is 0):
         "step": after every micro-batch; "epoch": at each epoch's end, NLL(retain) the mean over a
         no-grad pass of the epoch's batches. Each rank keeps its own alpha, as the reference's trainers do.
retain_loss_eps has no default: the task sets it (TOFU 0.3) or --set does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from harness import hookimpl
from harness.losses import IGNORE, forward_logits, token_mean_nll
from harness.methods import Method


@dataclass
class PDU(Method):
    name: ClassVar[str] = "pdu"
    display_name: ClassVar[str] = "PDU"
    retain_loss_eps: float | None = field(default=None, metadata={"required": True})
    gamma: float = 1.0
    alpha: float = 1.0
    primal_dual: bool = True
    dual_step_size: float = 1.0
    dual_update_upon: Literal["step", "epoch"] = "step"
    dual_warmup_epochs: int = 5

    def setup(self, run):
        self._run, self._dual = run, self.alpha

    def log_state(self):
        return {"retain_preference": self._dual}

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        logits = forward_logits(model, f)
        margin = logits.max(dim=-1).values - logits.mean(dim=-1)
        forget = margin.pow(2)[f["labels"] != IGNORE].mean()
        retain = token_mean_nll(forward_logits(model, r), r["labels"])
        loss = self.gamma * forget + self._dual * (retain - self.retain_loss_eps)
        if self.primal_dual and self.dual_update_upon == "step" and self._run.epoch >= self.dual_warmup_epochs:
            self._ascend(float(retain.detach()))
        return loss, {"forget": forget, "retain": retain}

    def epoch_end(self, model, batches):
        # the reference's callback runs when the epochs done (epoch + 1) reach the warm-up
        if self.primal_dual and self.dual_update_upon == "epoch" and self._run.epoch + 1 >= self.dual_warmup_epochs:
            nll = [float(token_mean_nll(forward_logits(model, b["retain"]), b["retain"]["labels"])) for b in batches()]
            self._ascend(sum(nll) / len(nll))

    def _ascend(self, retain):
        self._dual = max(0.0, self._dual + self.dual_step_size * (retain - self.retain_loss_eps))


@hookimpl
def register_methods(register):
    register(PDU)
