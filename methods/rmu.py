"""RMU (spec section 3): push the forget activations of one layer toward a random control vector, keep the
retain activations where the frozen start model has them (EMBED_DIFF).

A = output of the module full-matching ``module_regex`` (decoder layer 7's hidden states), M = labels != -100,
  l(A, Z) = mean_b [ sum_t M_bt * mean_d (A_btd - Z_btd)^2 / sum_t M_bt ]
  c = steering_coeff * u / ||u||,  u ~ U[0,1)^d drawn once from the run's seeded generator
  loss = gamma * l(A(forget), c) + alpha * l(A(retain), A_ref(retain))
Only parameters full-matching ``trainable_params`` are updated (gradients flow everywhere). Defaults are the
published yaml's (steering_coeff 2, every parameter trainable); the reference class defaults are 20 and
``model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight`` (the WMDP setup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from harness import hookimpl
from harness.activations import capture
from harness.losses import IGNORE, forward_logits
from harness.methods import Method


def activation_loss(act: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = (labels != IGNORE).float()
    per_token = (act.float() - target.float()).pow(2).mean(dim=-1)
    return ((per_token * mask).sum(dim=-1) / mask.sum(dim=-1)).mean()


@dataclass
class RMU(Method):
    name: ClassVar[str] = "rmu"
    display_name: ClassVar[str] = "RMU"
    reference: ClassVar[str] = "model"
    gamma: float = 1.0
    alpha: float = 1.0
    steering_coeff: float = 2.0
    module_regex: str = r"model\.layers\.7"
    trainable_params: str = ".*"

    def setup(self, run):
        self._run, self._control = run, None

    def loss(self, model, batch, ref):
        f, r = batch["forget"], batch["retain"]
        with capture(model, self.module_regex) as act:
            forward_logits(model, f)
            a_forget = act.output
            forward_logits(model, r)
            a_retain = act.output
        if self._control is None:  # lazily, as the reference does: d and the dtype come from the activation
            u = torch.rand(1, 1, a_forget.size(-1), generator=self._run.generator)
            self._control = (self.steering_coeff * u / u.norm()).to(a_forget.dtype).to(a_forget.device)
            self._run.record("rmu_control_vector", [round(x, 6) for x in self._control.flatten().tolist()[:8]])
        forget = activation_loss(a_forget, self._control, f["labels"])
        retain = activation_loss(a_retain, ref.activation(r, self.module_regex), r["labels"])
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(RMU)
