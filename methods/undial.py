"""UNDIAL (spec section 3): self-distillation toward the frozen start model with the true next token's logit
lowered by beta.

s_t, z_t: student and teacher (start model, no grad) logits at t = 0..T-2; y_{t+1}: the shifted labels.
  m_t(v) = 1 if v = y_{t+1}, where an ignored label (-100) indexes vocabulary entry V-100 (the reference's
           negative-index wrap: that token is penalised at prompt and padding positions)
  q_t = softmax(z_t - beta * m_t)
  forget = mean over ALL B*(T-1) positions (prompt and padding included) of -sum_v q_t(v) log softmax(s_t)(v)
  loss = gamma * forget + alpha * NLL(retain)       (published: alpha 0, beta 10; lr 1e-4, 10 epochs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from harness import hookimpl
from harness.losses import forward_logits, retain_loss
from harness.methods import Method


def undial_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    s, z, y = logits[:, :-1].float(), teacher[:, :-1].float(), labels[:, 1:]
    vocab = z.size(-1)
    mask = F.one_hot(y.remainder(vocab), vocab).float()  # -100 -> V-100 (remainder: also for a toy V < 100)
    q = F.softmax(z - beta * mask, dim=-1)
    return -(q * F.log_softmax(s, dim=-1)).sum(dim=-1).mean()


@dataclass
class UNDIAL(Method):
    name: ClassVar[str] = "undial"
    display_name: ClassVar[str] = "UNDIAL"
    reference: ClassVar[str] = "model"
    gamma: float = 1.0
    alpha: float = 0.0
    beta: float = 10.0

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        forget = undial_loss(forward_logits(model, f), ref.logits(f), f["labels"], self.beta)
        retain = retain_loss(model, r, ref)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(UNDIAL)
