"""AltPO, alternate preference optimisation (spec section 3, AltPO and DPO rows): DPO with answers the
start model makes up for each forget question as the preferred side, the true answer as the other.

Prepare step: the start model samples ``n_alternates`` answers to each forget question (temperature 1.0,
at most 200 new tokens, cut at "Question:" / "Q:", seeded from the run seed; cached in the run directory),
prompted with the question, its answer and PROMPT. Each alternate becomes one training row next to the
original answer, so the forget set has n_alternates rows per question, as in the reference.
forget = -(2/beta) mean_i logsigmoid(beta * ((log pi(alt_i) - log pi_ref(alt_i)) - (log pi(y_i) - log pi_ref(y_i))))
with sequence log-probs summed over answer tokens; retain = HF token-mean NLL;
loss = gamma * forget + alpha * retain. Defaults: the DPO config (beta=0.1, alpha=1, gamma=1); the
published grid is lr {1e-5, 2e-5, 5e-5} x beta {0.05, 0.1, 0.5} x alpha {1, 2, 5}, 2 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness import hookimpl
from harness.losses import dpo_loss, forward_logits, retain_loss, sequence_logprob
from harness.methods import Method

PROMPT = ("Question: {question}\nAnswer: {answer}\nNow write another version of the answer with some "
          "alternate plausible facts that change answer details.")
STOP = ("Question:", "Q:")


@dataclass
class AltPO(Method):
    name: ClassVar[str] = "altpo"
    display_name: ClassVar[str] = "AltPO"
    reference: ClassVar[str] = "logprobs"
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    n_alternates: int = 5
    temperature: float = 1.0
    max_new_tokens: int = 200

    def prepare(self, start):
        qa = start.require_qa(self.name)
        alts = start.generate([PROMPT.format(question=q, answer=a) for q, a in qa], n=self.n_alternates,
                              temperature=self.temperature, max_new_tokens=self.max_new_tokens, stop=STOP,
                              cache="altpo_alternates")
        rows = [(i, alt) for i, answers in enumerate(alts) for alt in answers]
        return {"forget": [start.items[i] for i, _ in rows],
                "alternate": [start.encode(qa[i][0], alt) for i, alt in rows]}

    def loss(self, model, batch, ref):
        f, w, r = batch["forget"], batch["alternate"], batch["retain"]
        lose = sequence_logprob(forward_logits(model, f), f["labels"])
        win = sequence_logprob(forward_logits(model, w), w["labels"])
        forget = dpo_loss(win, ref.sequence_logprob(w, "alternate"), lose, ref.sequence_logprob(f, "forget"),
                          self.beta)
        retain = retain_loss(model, r, ref)
        return self.gamma * forget + self.alpha * retain, {"forget": forget, "retain": retain}


@hookimpl
def register_methods(register):
    register(AltPO)
