"""WGA, weighted gradient ascent (Wang et al., 2025, "Rethinking LLM Unlearning Objectives"):
gradient ascent on the forget answers in which each answer token's NLL is weighted by the model's
own probability of that token raised to ``beta`` (a constant, no gradient through the weight).

    forget = -(1/N) * sum_t w_t * NLL_t,   w_t = stopgrad(exp(-NLL_t)) ** beta
    loss   = gamma * forget + alpha * NLL_mean(retain)

N counts the answer tokens of the micro-batch. Plain gradient ascent (``beta=0``) pushes hardest on
tokens the model already finds unlikely, so it keeps diverging after the forget answers are gone;
the weights shrink as a token is forgotten, so WGA slows down by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import HarnessError, hookimpl
from harness.losses import IGNORE, forward_logits, token_mean_nll, token_nll
from harness.methods import Method

__version__ = "0.1.0"


@dataclass
class WGA(Method):
    """Hyper-parameters are the dataclass fields: ``harness run -m wga --set wga.beta=0.5``."""

    name: ClassVar[str] = "wga"
    display_name: ClassVar[str] = "WGA"
    needs_reference: ClassVar[bool] = False  # no frozen start model: cheaper than NPO
    beta: float = 1.0
    gamma: float = 1.0
    alpha: float = 1.0

    def __post_init__(self):
        if self.beta < 0:
            raise HarnessError(f"wga.beta must be >= 0, got {self.beta}")

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        nll = token_nll(forward_logits(model, f), f["labels"])  # (B, T-1), 0 on prompt and padding
        mask = f["labels"][:, 1:] != IGNORE
        weight = (-nll.detach()).exp() ** self.beta
        forget = -(weight * nll)[mask].mean()
        retain = token_mean_nll(forward_logits(model, r), r["labels"])
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(WGA)
