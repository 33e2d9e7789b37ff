"""Data-parallel scoring: the ranks of a multi-process job (``--accelerate ddp|zero3``, ``accelerate
launch -m harness eval ...``, torchrun) each score a shard of every data source, and the per-row values
are gathered back in the rows' order.

Every rank then holds the full per-sample values, so each metric (KS tests, ROUGE means, MIA AUCs over
all rows) is computed from exactly what one process computes; rank 0 alone writes files.

- Rows, not items, are dealt out: the answers of one option set stay together (shared question prefix).
- The rows are taken longest first, as the primitives batch them, and dealt in blocks of one batch
  each, round robin. A rank's rows are passed in dataset order; the primitive's stable length sort
  then rebuilds the blocks as its batches, so those batches are the single process's and the values
  are bit for bit the same where the primitive batches by count (a batch cut by memory bounds, or
  another batching, changes only float rounding, as between sorted and dataset-order batching).
- Scored models are plain on every rank (the training loop consolidates ZeRO-3 weights before it
  returns), so a forward or ``generate`` carries no collective; the only collectives are the gathers
  here, one per primitive, which every rank reaches in the same order because every rank runs the same
  metric sequence. Decisions that could differ between ranks (a cache file present, a run finished,
  another job's lock) are taken by rank 0 and broadcast (``agree``).
"""

from __future__ import annotations

import os
from datetime import timedelta

from harness import HarnessError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; brings the process group up when a launcher started the
    process and nothing has yet (``harness eval`` builds no Accelerator)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        _init_group()
    return dist.get_rank(), dist.get_world_size()


def _init_group() -> None:
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=int(os.environ.get("HARNESS_DIST_TIMEOUT", "10800")))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def is_writer() -> bool:
    """True on the one process that writes result files and caches (rank 0, or a single process)."""
    return world()[0] == 0


def agree(value):
    """Rank 0's ``value`` on every rank (a picklable object); ``value`` itself in a single process."""
    rank, n = world()
    if n == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wait() -> None:
    """Every rank waits here until all arrive (e.g. until rank 0 has written the result files)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _slots(slot) -> list[int]:
    return slot if isinstance(slot, list) else [slot]


def deal(items: list[dict], layout: list, batch_size: int, n: int) -> list[list[int]]:
    """Row indices (dataset order) that each of ``n`` ranks scores.

    A row is one layout slot: an item, or the list of items of an option set. Rows are ordered longest
    first (stable, by their longest item) and cut into blocks that fill one batch (``batch_size`` items;
    for option sets ``batch_size // set size`` rows); block ``b`` goes to rank ``b % n``."""
    lengths = [max(len(items[j]["input_ids"]) for j in _slots(s)) if _slots(s) else 0 for s in layout]
    order = sorted(range(len(layout)), key=lambda r: -lengths[r])
    width = max((len(_slots(s)) for s in layout if isinstance(s, list)), default=1)
    block = max(1, batch_size // width)
    shards: list[list[int]] = [[] for _ in range(n)]
    for b in range(0, len(order), block):
        shards[(b // block) % n].extend(order[b:b + block])
    return [sorted(s) for s in shards]


def sharded(compute, items: list[dict], layout: list, *, batch_size: int, model=None) -> list:
    """``compute(items, layout) -> one value per item`` over this rank's shard of the rows, gathered from
    every rank into one value per item of ``items`` (in their order). A single process calls
    ``compute(items, layout)`` itself."""
    rank, n = world()
    if n == 1 or not layout:
        return compute(items, layout)
    if model is not None and any(hasattr(p, "ds_id") for p in model.parameters()):
        # a ZeRO-3 shard would need every rank's forwards in lock-step; scoring gets consolidated models
        raise HarnessError("data-parallel scoring needs the whole model on every rank, got a ZeRO-3 partitioned "
                           "one (consolidate it first: harness.training.distributed.consolidate)")
    mine = deal(items, layout, batch_size, n)[rank]
    sub_items: list[dict] = []
    sub_layout: list = []
    for r in mine:
        slot = layout[r]
        idx = list(range(len(sub_items), len(sub_items) + len(_slots(slot))))
        sub_items.extend(items[j] for j in _slots(slot))
        sub_layout.append(idx if isinstance(slot, list) else idx[0])
    vals = compute(sub_items, sub_layout) if sub_items else []
    part = {r: [vals[j] for j in _slots(s)] for r, s in zip(mine, sub_layout)}
    import torch.distributed as dist

    parts: list = [None] * n
    dist.all_gather_object(parts, part)
    out: list = [None] * len(items)
    for p in parts:
        for r, values in p.items():
            for j, v in zip(_slots(layout[r]), values):
                out[j] = v
    return out
