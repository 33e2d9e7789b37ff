"""Batches of encoded items, the seeded anchor order and the per-rank pairing generator (spec 2.5, 2.6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from harness import HarnessError
from harness.data.encode import collate as fmt_collate


def collate(items: Sequence[dict], pad_id: int, mask: str = "reference", side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded items (right unless ``side="left"``) with ``harness.data.encode.collate`` (spec 2.5), keeping ``index`` and ``alt``.

    ``mask="reference"`` gives ``attention_mask = input_ids != pad_id`` (the reference collator, which also
    hides real tokens equal to pad); ``"corrected"`` masks only the padding.
    """
    out = fmt_collate(list(items), pad_id, side=side, mask=mask)
    if "alt" in items[0]:
        out["alt"] = torch.as_tensor([int(it["alt"]) for it in items], dtype=torch.long)
    return out


def _to(part: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in part.items()}


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise HarnessError("tokenizer has neither a pad nor an eos token; set one before training")
    return int(pad)


def pairing_generator(seed: int, rank: int) -> torch.Generator:
    """The per-rank generator that draws retain (and idk) partners; distinct per rank, fixed per seed."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (int(rank) + 1))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's anchor indices for ``epoch``: a seeded permutation shared by all ranks, strided by rank.

    The permutation is padded by wrapping so every rank gets the same count (ranks must stay in step).
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world_size) * world_size
    perm = perm + perm[: total - n] if total > n else perm
    return perm[rank::world_size]
