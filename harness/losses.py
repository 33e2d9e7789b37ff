"""Pure loss helpers for unlearning methods (spec section 3).

Every function takes logits (any float dtype; upcast to fp32 here, because transformers 5 no longer
upcasts Llama logits as the 4.45 release behind the published numbers did) and labels with prompt
positions set to -100. Shapes: logits (B, T, V), labels (B, T). Labels are shifted inside: the logit
at position t predicts label t+1, as in a causal LM.

The normalisations differ per method on purpose (spec 13 item 12):
- ``token_mean_nll``: HF ``model(**batch).loss``, mean CE over all label tokens of the micro-batch
  (GradAscent, GradDiff, every NLL retain term).
- ``sequence_nll``: per-sequence SUM of token NLLs (NPO and DPO sequence log-probs).
- ``simnpo_loss`` uses the per-sequence MEAN NLL, with the count taken on unshifted labels.
- ``kl_retain``: KL(ref || current) averaged over all B*T positions, prompt and padding included.
- ``activation_mse``: per-sequence mean over label positions of the hidden-dim mean squared error (RMU).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100


def forward_logits(model, part: dict) -> torch.Tensor:
    """fp32 logits of ``model`` on one batch part (``input_ids``, ``attention_mask``)."""
    out = model(input_ids=part["input_ids"], attention_mask=part.get("attention_mask"), use_cache=False)
    return out.logits.float()


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1, :].float(), labels[:, 1:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) NLL of each shifted label token; 0 where the label is -100."""
    lg, lb = _shift(logits, labels)
    nll = F.cross_entropy(lg.transpose(1, 2), lb.clamp(min=0), reduction="none")
    return nll * (lb != IGNORE)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of token NLLs over the label tokens of each sequence (``NLL_sum``)."""
    return token_nll(logits, labels).sum(dim=-1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) log pi(y|x) = -NLL_sum: the sequence log-probability NPO and DPO compare."""
    return -sequence_nll(logits, labels)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar HF causal-LM loss: mean CE over every label token of the micro-batch (token-weighted)."""
    lg, lb = _shift(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE, reduction="mean")


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO forget loss ``-(2/beta) * mean_i logsigmoid(-beta * (logp_i - ref_logp_i))``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def dpo_loss(
    logp_win: torch.Tensor,
    ref_logp_win: torch.Tensor,
    logp_lose: torch.Tensor,
    ref_logp_lose: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO loss with the reference code's 2/beta factor: ``-(2/beta) mean logsigmoid(beta (dw - dl))``.

    ``d = logp - ref_logp``; win is the preferred (idk) answer, lose the original forget answer.
    """
    margin = (logp_win - ref_logp_win) - (logp_lose - ref_logp_lose)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO forget loss ``-(2/beta) mean_i logsigmoid(beta * (NLL_sum_i / n_i - delta))``.

    ``n_i`` counts the UNSHIFTED labels != -100, as the reference code does (for prompt-masked items it
    equals the shifted count because label 0 is always masked).
    """
    n = (labels != IGNORE).sum(dim=-1).clamp(min=1)
    avg = sequence_nll(logits, labels) / n
    return -(2.0 / beta) * F.logsigmoid(beta * (avg - delta)).mean()


def kl_retain(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_cur)`` summed over the vocabulary, averaged over ALL B*T positions.

    Equals ``kl_div(log p_cur, log p_ref, reduction="batchmean", log_target=True)`` after flattening to
    (B*T, V): no label mask, prompt and padding positions count (spec section 3).
    """
    cur = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
    ref = F.log_softmax(ref_logits.float(), dim=-1).reshape(-1, ref_logits.size(-1))
    return F.kl_div(cur, ref, reduction="batchmean", log_target=True)


def activation_mse(act: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RMU's ``mean_b [ sum_t M_bt mean_d (A_btd - Z_btd)^2 / sum_t M_bt ]``, ``M = labels != -100`` (unshifted).

    ``target`` broadcasts against ``act`` (RMU's (1, 1, d) control vector); computed in fp32."""
    mask = (labels != IGNORE).float()
    per_token = (act.float() - target.float()).pow(2).mean(dim=-1)
    return ((per_token * mask).sum(dim=-1) / mask.sum(dim=-1)).mean()


# The retain terms of GradDiff, NPO and IdkDPO; a ``Literal`` field of this type is checked by build_method.
RetainLossType = Literal["NLL", "KL"]


def retain_loss(model, part: dict, ref, loss_type: RetainLossType = "NLL") -> torch.Tensor:
    """GradDiff's retain term (spec section 3): HF token-mean NLL, or KL to the frozen start model."""
    logits = forward_logits(model, part)
    if loss_type == "KL":
        return kl_retain(logits, ref.logits(part))
    return token_mean_nll(logits, part["labels"])
