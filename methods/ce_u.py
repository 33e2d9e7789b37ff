"""CE-U, cross-entropy unlearning (spec section 3): at every answer position, move the prediction towards
the model's own (detached) distribution with the true token's probability set to zero.

On the UNSHIFTED labels the first ``ignore_first_n_answer_tokens`` valid tokens of each sequence are
set to -100 first (cumsum(valid) <= n: by default the prediction of the first answer token is left out).
Then, at each remaining shifted position t with label y: q_t = softmax(stopgrad(z_t) with z_t[y] = -inf),
loss = mean over those positions of -sum_v q_t(v) log softmax(z_t)(v). No retain term (the reference's
CE-U ignores the retain batch) and no reference model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from harness import hookimpl
from harness.losses import IGNORE, forward_logits
from harness.methods import Method


@dataclass
class CEU(Method):
    name: ClassVar[str] = "ce_u"
    display_name: ClassVar[str] = "CE-U"
    ignore_first_n_answer_tokens: int = 1

    def loss(self, model, batch, ref):
        f = batch["forget"]
        labels = f["labels"]
        valid = labels != IGNORE
        labels = labels.masked_fill(valid & (valid.cumsum(-1) <= self.ignore_first_n_answer_tokens), IGNORE)
        logits, labels = forward_logits(model, f)[:, :-1], labels[:, 1:]
        keep = labels != IGNORE
        z, y = logits[keep], labels[keep]
        target = F.softmax(z.detach().scatter(-1, y.unsqueeze(-1), -torch.inf), dim=-1)
        forget = F.cross_entropy(z, target)
        return forget, {"forget": forget}


@hookimpl
def register_methods(register):
    register(CEU)
