"""The frozen start model a method compares against (NPO, IdkDPO, KL retain losses, UNDIAL's teacher, RMU's
retain activations), with memoised sequence log-probs; sharded like the policy under ZeRO-3."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness import HarnessError
from harness.activations import capture
from harness.losses import forward_logits, sequence_logprob
from harness.training import distributed as dist_utils
from harness.training.batching import _to, collate


class StartModel:
    """What ``Method.loss(model, batch, ref)`` gets as ``ref``: the frozen start model and its log-probs.

    - ``sequence_logprob(part, name)``: (B,) reference ``log pi_ref(y|x)`` (sum over label tokens) of a
      batch part. Values are memoised by ``(name, index[, alt])``: the forget set is computed once before
      training (``precompute``) and reused every epoch; idk pairs are memoised as they are first drawn.
      With ``cache=False`` every call recomputes (the cached path equals it within 1e-6 relative).
    - ``logits(part)``: fp32 logits of the live frozen model, no grad (KL retain losses, UNDIAL's teacher);
      an error unless ``allow_logits`` (core passes it for methods declaring ``reference = "model"``).
    - ``activation(part, regex)``: the output of the frozen model's module whose name full-matches ``regex``
      (``harness.activations.capture``), no grad (RMU's retain targets); same condition as ``logits``.
    ``forwards`` counts the reference forward passes run; ``model`` is ``None`` once released.
    Under ZeRO-3 the model is sharded like the policy, so every rank runs each forward together: a cache
    miss on any rank makes all ranks run that batch.
    """

    def __init__(self, model, *, cache: bool = True, keep_model: bool = True, allow_logits: bool = True,
                 accelerator=None):
        self.model = model
        self.cache = cache
        self.keep_model = keep_model
        self.allow_logits = allow_logits
        self._acc = accelerator
        self._memo: dict[tuple, float] = {}
        self.forwards = 0  # reference forward passes run (for the benchmark and tests)

    @property
    def device(self):
        return self._acc.device if self._acc is not None else torch.device("cpu")

    def _sharded(self) -> bool:
        return self._acc is not None and dist_utils.zero_stage(self._acc) == 3 and self._acc.num_processes > 1

    @staticmethod
    def _keys(part: dict, name: str) -> list[tuple]:
        if "index" not in part:
            raise HarnessError(f"reference log-probs of batch part {name!r} need an 'index' tensor")
        idx = part["index"].tolist()
        alt = part["alt"].tolist() if "alt" in part else [None] * len(idx)
        return [(name, i, a) for i, a in zip(idx, alt)]

    @torch.no_grad()
    def _compute(self, part: dict) -> torch.Tensor:
        if self.model is None:
            raise HarnessError(
                "reference model was released after precomputing log-probs, but a new sequence was asked for"
            )
        self.forwards += 1
        return sequence_logprob(forward_logits(self.model, part), part["labels"])

    @torch.no_grad()
    def sequence_logprob(self, part: dict, name: str = "forget") -> torch.Tensor:
        """(B,) reference sequence log-probs of ``part`` (the sum over label tokens, fp32)."""
        device = part["input_ids"].device
        if not self.cache:
            return self._compute(part).to(device)
        keys = self._keys(part, name)
        miss = any(k not in self._memo for k in keys)
        if self._sharded():
            flag = torch.tensor([1.0 if miss else 0.0], device=self.device)
            miss = bool(self._acc.reduce(flag, reduction="sum").item() > 0)
        if miss:
            values = self._compute(part).tolist()
            for k, v in zip(keys, values):
                self._memo.setdefault(k, v)
        return torch.tensor([self._memo[k] for k in keys], dtype=torch.float32, device=device)

    def _live(self, what: str):
        if not self.allow_logits:
            raise HarnessError(f"this method asked for live reference {what} but declares reference='logprobs'; "
                               "declare reference='model' (or return it from reference_needed())")
        if self.model is None:
            raise HarnessError(f"this method asked for live reference {what} but the reference model was released")
        self.forwards += 1
        return self.model

    @torch.no_grad()
    def logits(self, part: dict) -> torch.Tensor:
        """fp32 logits of the frozen start model on ``part`` (no grad)."""
        return forward_logits(self._live("logits"), part)

    @torch.no_grad()
    def activation(self, part: dict, regex: str) -> torch.Tensor:
        """The output of the frozen model's module matching ``regex`` on ``part`` (no grad, its own dtype)."""
        model = self._live("activations")
        with capture(model, regex) as cap:
            forward_logits(model, part)
        return cap.output

    @torch.no_grad()
    def precompute(self, items: Sequence[dict], name: str, *, pad_id: int, batch_size: int, mask: str) -> None:
        """Memoise reference log-probs of every item (each item carries its dataset ``index``)."""
        if not self.cache:
            return
        for start in range(0, len(items), batch_size):
            part = _to(collate(items[start : start + batch_size], pad_id, mask), self.device)
            keys = self._keys(part, name)
            for k, v in zip(keys, self._compute(part).tolist()):
                self._memo[k] = v

    def release_model(self) -> None:
        """Drop the frozen model when only memoised log-probs will be needed (saves one model of memory)."""
        if not self.keep_model and self.cache:
            self.model = None
