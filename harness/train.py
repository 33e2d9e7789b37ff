"""The one training loop: finetuning (plain NLL) and unlearning (any ``Method``), single process, DDP or
DeepSpeed ZeRO-3 through accelerate.

Core decides everything that makes runs comparable (spec sections 2.6 and 4):
- the effective (global) batch ``batch_size`` is the contract; gradient accumulation is derived as
  ``batch_size / (per_device_batch * world_size)`` and must divide exactly;
- the anchor (forget) order is reshuffled every epoch by a generator seeded with ``seed + epoch`` (the
  same on every rank), each rank takes every ``world_size``-th example (wrapping so ranks stay in step);
- each forget example is paired with a retain example (and, for idk methods, an idk answer) drawn fresh
  at every access from a per-rank generator seeded from ``(seed, rank)``, never the global RNG;
- AdamW (``paged_adamw_32bit`` by default, as published), weight decay except biases and norm weights,
  gradient clipping, linear schedule with warmup steps ``int(warmup_epochs * N // batch_size)`` from the
  real world size (TOFU), or constant (MUSE);
- micro-batch losses are divided by the accumulation steps (the pre-4.46 HF behaviour the published
  numbers used); the last step of an epoch may have fewer micro-batches;
- ``train_log.jsonl``: one line per optimizer step, appended and fsynced as it is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import HarnessError
from harness import distributed as dist_utils
from harness.formatting import collate as fmt_collate
from harness.losses import forward_logits, sequence_logprob, token_mean_nll

SCHEDULES = ("linear", "constant")
OPTIMIZERS = ("paged_adamw_32bit", "adamw_torch", "adamw_32bit")


@dataclass
class TrainConfig:
    """Training hyper-parameters. Defaults are the published TOFU unlearning setup (spec 4.1)."""

    epochs: int = 10
    lr: float = 1e-5
    batch_size: int = 32  # effective (global) batch: per_device_batch * grad_accum * world_size
    per_device_batch: int = 4
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    schedule: str = "linear"  # "linear" (with warmup) | "constant" (MUSE; warmup then constant if > 0)
    optimizer: str = "paged_adamw_32bit"  # bitsandbytes on CUDA; the same update rule unpaged on CPU
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    max_length: int = 512  # used by callers when encoding items; recorded with the config
    accelerate: str = "single"  # "single" | "ddp" | "zero3" | path to an accelerate config file
    attention_mask: str = "pad_eq"  # collator mask: "pad_eq" (reference quirk) or "length"

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise HarnessError(f"training schedule {self.schedule!r} unknown; use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise HarnessError(f"optimizer {self.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "per_device_batch"):
            if int(getattr(self, name)) < 1:
                raise HarnessError(f"training {name} must be >= 1, got {getattr(self, name)}")
        if self.attention_mask not in ("pad_eq", "length"):
            raise HarnessError(f"attention_mask {self.attention_mask!r} unknown; use pad_eq or length")

    def grad_accum(self, world_size: int) -> int:
        """Gradient accumulation steps for ``world_size`` processes; an error if it does not divide."""
        per_step = self.per_device_batch * world_size
        if self.batch_size % per_step:
            raise HarnessError(
                f"--batch-size {self.batch_size} is not divisible by per-device batch {self.per_device_batch} x "
                f"{world_size} process(es); choose a batch size that is a multiple of {per_step}"
            )
        return self.batch_size // per_step


def plan(cfg: TrainConfig, n_examples: int, world_size: int) -> dict[str, int]:
    """Derived step counts, recorded in config.yaml: grad_accum, steps_per_epoch, total_steps, warmup_steps."""
    ga = cfg.grad_accum(world_size)
    per_rank = math.ceil(n_examples / world_size)
    micro = math.ceil(per_rank / cfg.per_device_batch)
    steps_per_epoch = math.ceil(micro / ga)
    # Spec 4.1 with the real number of processes in place of the visible GPU count.
    warmup = int((cfg.warmup_epochs * n_examples) // cfg.batch_size)
    return {
        "world_size": world_size,
        "grad_accum": ga,
        "micro_batches_per_epoch": micro,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * int(cfg.epochs),
        "warmup_steps": warmup,
    }


# ---------------------------------------------------------------------------------------------------
# batching


def collate(items: Sequence[dict], pad_id: int, mask: str = "pad_eq") -> dict[str, torch.Tensor]:
    """Right-pad encoded items with ``harness.formatting.collate`` (spec 2.5), keeping ``index`` and ``alt``.

    ``mask="pad_eq"`` gives ``attention_mask = input_ids != pad_id`` (the reference collator, which also
    hides real tokens equal to pad); ``"length"`` masks only the padding.
    """
    out = fmt_collate(list(items), pad_id, side="right", mask=mask)
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


# ---------------------------------------------------------------------------------------------------
# optimizer, schedule


def _decay_parameter_names(model) -> set[str]:
    """Parameters that get weight decay: everything but biases and norm weights (HF Trainer's rule)."""
    no_decay = set()
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or "bias" in p_name:
                no_decay.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return {n for n, _ in model.named_parameters() if n not in no_decay}


def build_optimizer(model, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over the trainable parameters with HF's weight-decay groups; returns (optimizer, resolved name).

    ``paged_adamw_32bit`` is bitsandbytes' paged AdamW on CUDA. On CPU paging does not exist and
    bitsandbytes' 32-bit AdamW equals torch's AdamW to 4e-8, so torch's (faster on CPU) is used and the
    resolved name says so.
    """
    decay = _decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    on_cuda = any(p.is_cuda for _, p in named) or torch.cuda.is_available()
    kwargs = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer in ("paged_adamw_32bit", "adamw_32bit") and on_cuda:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW32bit if cfg.optimizer == "paged_adamw_32bit" else bnb.optim.AdamW32bit
        return cls(groups, **kwargs), cfg.optimizer
    resolved = "adamw_torch" if cfg.optimizer == "adamw_torch" else f"adamw_torch (for {cfg.optimizer} on CPU)"
    return torch.optim.AdamW(groups, **kwargs), resolved


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    if cfg.schedule == "linear":
        name = "linear"
    else:
        name = "constant_with_warmup" if warmup_steps > 0 else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


# ---------------------------------------------------------------------------------------------------
# reference


class Reference:
    """What ``Method.loss(model, batch, ref)`` gets as ``ref``: the frozen start model and its log-probs.

    - ``sequence_logprob(part, name)``: (B,) reference ``log pi_ref(y|x)`` (sum over label tokens) of a
      batch part. Values are memoised by ``(name, index[, alt])``: the forget set is computed once before
      training (``precompute``) and reused every epoch; idk pairs are memoised as they are first drawn.
      With ``cache=False`` every call recomputes (the cached path equals it within 1e-6 relative).
    - ``logits(part)``: fp32 logits of the live frozen model, no grad (KL retain losses).
    Under ZeRO-3 the model is sharded like the policy, so every rank runs each forward together: a cache
    miss on any rank makes all ranks run that batch.
    """

    def __init__(self, model, *, cache: bool = True, keep_model: bool = True, accelerator=None):
        self.model = model
        self.cache = cache
        self.keep_model = keep_model
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

    @torch.no_grad()
    def logits(self, part: dict) -> torch.Tensor:
        """fp32 logits of the frozen start model on ``part`` (no grad)."""
        if self.model is None:
            raise HarnessError("this method asked for live reference logits but the reference model was released")
        self.forwards += 1
        return forward_logits(self.model, part)

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
        if not self.keep_model:
            self.model = None


# ---------------------------------------------------------------------------------------------------
# the loop


class _StepLog:
    """train_log.jsonl: one JSON line per optimizer step, appended and fsynced (finished lines survive crashes)."""

    def __init__(self, out_dir: Path | None, enabled: bool):
        self.path = Path(out_dir) / "train_log.jsonl" if (out_dir is not None and enabled) else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _scalar(x) -> float:
    return float(x.detach().float().item()) if torch.is_tensor(x) else float(x)


def _run(
    model,
    tokenizer,
    cfg: TrainConfig,
    *,
    n_anchor: int,
    make_batch: Callable[[list[int], torch.Generator], dict],
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]],
    out_dir: Path | None,
    desc: str,
    accelerator=None,
    after_prepare: Callable[[Any, int], None] | None = None,
    save_dir: Path | None = None,
):
    """The loop shared by ``finetune`` and ``unlearn``. Returns the trained plain model (unsharded)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    if n_anchor < 1:
        raise HarnessError(f"{desc}: no training examples")
    if dist_utils.is_partitioned(model):
        raise HarnessError(
            f"{desc}: the model passed in is already ZeRO-3 partitioned; load it before training starts "
            "(outside an active DeepSpeed config)"
        )
    acc = accelerator or dist_utils.make_accelerator(cfg.accelerate)
    world, rank = acc.num_processes, acc.process_index
    steps = plan(cfg, n_anchor, world)
    ga = steps["grad_accum"]
    acc.gradient_accumulation_steps = ga
    if dist_utils.is_deepspeed(acc):
        dist_utils.configure_deepspeed(acc, per_device_batch=cfg.per_device_batch, grad_accum=ga,
                                       max_grad_norm=cfg.max_grad_norm)
    set_seed(cfg.seed)
    pad_id = _pad_id(tokenizer)

    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "config"):
            model.config.use_cache = False
    model.train()
    optimizer, resolved_opt = build_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg, steps["total_steps"], steps["warmup_steps"])
    info = {**steps, "optimizer": resolved_opt}
    if after_prepare is not None:
        after_prepare(acc, pad_id)  # e.g. shard the reference model like the policy, precompute log-probs

    log = _StepLog(out_dir, acc.is_main_process)
    gen = pairing_generator(cfg.seed, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
    bar = tqdm(total=steps["total_steps"], desc=desc, disable=not acc.is_local_main_process, dynamic_ncols=True)
    step = 0
    try:
        for epoch in range(int(cfg.epochs)):
            order = epoch_order(n_anchor, cfg.seed, epoch, rank, world)
            micro = [order[i : i + cfg.per_device_batch] for i in range(0, len(order), cfg.per_device_batch)]
            for start in range(0, len(micro), ga):
                group = micro[start : start + ga]
                sums: dict[str, float] = {}
                for k, idx in enumerate(group):
                    batch = {name: _to(part, acc.device) for name, part in make_batch(idx, gen).items()}
                    boundary = k == len(group) - 1
                    acc.sync_gradients = boundary
                    ctx = acc.no_sync(model) if not boundary and not dist_utils.is_deepspeed(acc) else _null()
                    with ctx:
                        loss, parts = loss_fn(model, batch)
                        _check_finite(acc, loss, desc, step + 1, epoch, out_dir)
                        acc.backward(loss)
                    for key, val in {"loss": loss, **parts}.items():
                        sums[key] = sums.get(key, 0.0) + _scalar(val)
                # The pre-clipping norm, as HF logs it (DeepSpeed clips inside its step and reports it).
                grad_norm = acc.clip_grad_norm_(params, max_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                means = {k: v / len(group) for k, v in sums.items()}
                if world > 1:
                    keys = sorted(means)
                    t = torch.tensor([means[k] for k in keys], device=acc.device)
                    t = acc.reduce(t, reduction="mean")
                    means = dict(zip(keys, t.tolist()))
                row = {"step": step, "epoch": round(epoch + (start + len(group)) / len(micro), 4), **means,
                       "grad_norm": None if grad_norm is None else _scalar(grad_norm), "lr": lr}
                log.write(row)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                bar.update(1)
    except BaseException:
        dist_utils.release(acc)  # a later model load must not come out ZeRO-3 partitioned
        raise
    finally:
        bar.close()
    acc.wait_for_everyone()
    plain = dist_utils.consolidate(acc, model)
    plain.eval()
    if save_dir is not None:
        save_model(plain, tokenizer, save_dir, is_main=acc.is_main_process)
        acc.wait_for_everyone()
    dist_utils.release(acc)
    plain.train_info = info  # recorded by callers in config.yaml
    return plain


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _check_finite(acc, loss: torch.Tensor, desc: str, step: int, epoch: int, out_dir) -> None:
    bad = not torch.isfinite(loss.detach()).all()
    if acc.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
        bad = acc.reduce(flag, reduction="sum").item() > 0
    if bad:
        where = f"; the log so far is in {Path(out_dir) / 'train_log.jsonl'}" if out_dir is not None else ""
        raise HarnessError(
            f"{desc}: loss became {float(loss.detach()):g} at optimizer step {step} (epoch {epoch}); "
            f"stopping. Lower the learning rate or check the method's hyper-parameters{where}"
        )


def save_model(model, tokenizer, out: Path, *, is_main: bool = True) -> None:
    """Save a normal Hugging Face checkpoint (safetensors + config + tokenizer) to ``out``."""
    if not is_main:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------------
# public entry points


def finetune(model, tokenizer, items: Sequence[dict], cfg: TrainConfig, *, desc: str = "finetune",
             out_dir: Path | None = None, save_dir: Path | None = None, accelerator=None):
    """Finetune ``model`` on encoded ``items`` (dicts with ``input_ids`` and ``labels``) with plain NLL.

    The loss is HF's token-mean cross-entropy over each micro-batch. Deterministic for a given
    ``cfg.seed`` (same order, same updates). Returns the trained model (plain, in eval mode);
    ``out_dir`` gets ``train_log.jsonl``, ``save_dir`` a Hugging Face checkpoint.
    """
    items = list(items)
    pad_id = _pad_id(tokenizer)

    def make_batch(idx, _gen):
        return {"train": collate([items[i] for i in idx], pad_id, cfg.attention_mask)}

    def loss_fn(m, batch):
        part = batch["train"]
        return token_mean_nll(forward_logits(m, part), part["labels"]), {}

    return _run(model, tokenizer, cfg, n_anchor=len(items), make_batch=make_batch, loss_fn=loss_fn,
                out_dir=out_dir, desc=desc, accelerator=accelerator, save_dir=save_dir)


def method_uses_reference(method) -> bool:
    """Whether ``method`` (an instance) needs the frozen start model (read on the instance: hyper-parameters
    such as ``retain_loss_type="KL"`` can switch it on)."""
    return bool(getattr(method, "needs_reference", False))


def unlearn(
    model,
    tokenizer,
    method,
    forget_items: Sequence[dict],
    retain_items: Sequence[dict],
    cfg: TrainConfig,
    *,
    idk_items: Sequence[Sequence[dict]] | None = None,
    out_dir: Path | None = None,
    ref_model=None,
    cache_reference: bool = True,
    save_dir: Path | None = None,
    accelerator=None,
    desc: str | None = None,
):
    """Unlearn ``forget_items`` from ``model`` with ``method`` (a ``harness.methods.Method`` instance).

    - ``forget_items``/``retain_items``: encoded items (``input_ids``, ``labels``) in dataset order; the
      anchor is the forget set, each forget example gets a fresh uniformly drawn retain partner.
    - ``idk_items`` (methods with ``uses_idk``): ``idk_items[i]`` is the list of encoded alternatives for
      forget example ``i`` (the forget question with each idk answer, encoded by the caller with the
      model's template); one is drawn uniformly per access from the per-rank generator.
    - ``ref_model``: the frozen reference; default a copy of ``model`` as it is at the start.
    - ``cache_reference``: memoise reference sequence log-probs (forget set precomputed once). When the
      method declares ``reference_logprobs_only`` (NPO, IdkDPO with NLL retain) and has no idk pairs the
      frozen model is then released before training.
    - ``out_dir``: gets ``train_log.jsonl``; ``save_dir``: a Hugging Face checkpoint of the result.
    Batches given to ``method.loss`` are ``{"forget", "retain"[, "idk"]}`` parts with ``input_ids``,
    ``attention_mask``, ``labels`` and ``index`` (idk parts also ``alt``, the drawn alternative).
    Returns the unlearned plain model in eval mode; ``model.train_info`` holds the derived step counts.
    """
    forget = [{**it, "index": i} for i, it in enumerate(forget_items)]
    retain = [{**it, "index": i} for i, it in enumerate(retain_items or [])]
    uses_idk = bool(getattr(method, "uses_idk", False))
    if uses_idk:
        if idk_items is None or len(idk_items) != len(forget):
            raise HarnessError(
                f"method '{method.name}' needs idk answers: pass idk_items with one list of encoded "
                f"alternatives per forget example ({len(forget)})"
            )
        if any(len(alts) == 0 for alts in idk_items):
            raise HarnessError(f"method '{method.name}': a forget example has no idk alternatives")
    pad_id = _pad_id(tokenizer)
    mask = cfg.attention_mask
    needs_ref = method_uses_reference(method)
    ref_holder: dict[str, Reference] = {}
    start_ref = ref_model
    if needs_ref and start_ref is None:
        # Copied before the policy is prepared: ZeRO-3 partitions the policy's parameters in place.
        start_ref = copy.deepcopy(model)

    def make_batch(idx, gen):
        batch = {"forget": collate([forget[i] for i in idx], pad_id, mask)}
        if retain:
            r = torch.randint(0, len(retain), (len(idx),), generator=gen).tolist()
            batch["retain"] = collate([retain[j] for j in r], pad_id, mask)
        if uses_idk:
            alts = []
            for i in idx:
                j = int(torch.randint(0, len(idk_items[i]), (1,), generator=gen))
                alts.append({**idk_items[i][j], "index": i, "alt": j})
            batch["idk"] = collate(alts, pad_id, mask)
        return batch

    def loss_fn(m, batch):
        out = method.loss(m, batch, ref_holder.get("ref"))
        if isinstance(out, tuple):
            return out[0], dict(out[1])
        return out, {}

    def after_prepare(acc, pad):
        if not needs_ref:
            return
        ref_net = dist_utils.prepare_reference(acc, start_ref)
        only_logprobs = bool(getattr(method, "reference_logprobs_only", False))
        ref = Reference(ref_net, cache=cache_reference, keep_model=not (only_logprobs and not uses_idk),
                        accelerator=acc)
        ref.precompute(forget, "forget", pad_id=pad, batch_size=cfg.per_device_batch, mask=mask)
        if cache_reference:
            ref.release_model()
        ref_holder["ref"] = ref

    result = _run(model, tokenizer, cfg, n_anchor=len(forget), make_batch=make_batch, loss_fn=loss_fn,
                  out_dir=out_dir, desc=desc or f"unlearn {method.name}", accelerator=accelerator,
                  after_prepare=after_prepare, save_dir=save_dir)
    if "ref" in ref_holder:
        result.train_info["reference_forwards"] = ref_holder["ref"].forwards
    ref_holder.clear()
    return result


def config_dict(cfg: TrainConfig) -> dict:
    """The config as a plain dict (for config.yaml and the run hash)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------
# `harness finetune`

TOFU_SPLITS = ("full", "retain99", "retain95", "retain90", "forget01", "forget05", "forget10")


def _whole(name: str, value) -> int:
    if float(value) != int(float(value)):
        raise HarnessError(f"--{name} must be a whole number, got {value}")
    return int(float(value))


def finetune_config(args) -> TrainConfig:
    """TrainConfig from ``harness finetune`` flags (defaults: TOFU finetuning, spec 4.1)."""
    g = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    cfg = TrainConfig(
        epochs=_whole("epochs", g("epochs", 5)), lr=float(g("lr", 1e-5)), batch_size=int(g("batch_size", 32)),
        per_device_batch=int(g("per_device_batch", 4)), warmup_epochs=float(g("warmup_epochs", 1.0)),
        weight_decay=float(g("weight_decay", 0.01)), schedule="linear", optimizer=g("optimizer", "paged_adamw_32bit"),
        seed=int(g("seed", 0)), gradient_checkpointing=bool(g("gradient_checkpointing", False)),
        max_length=int(g("max_length", 512)), accelerate=g("accelerate", "single") or "single",
    )
    cfg.validate()
    return cfg


def _finetune_source(args):
    """(weights, tokenizer source, template, dtype) for ``--model`` = profile name, tiny:<kind>, hub id or dir."""
    from harness.profiles import get_profiles, load_template_file

    model = args.model
    template = load_template_file(args.template) if getattr(args, "template", None) else None
    profiles = get_profiles()
    if model.startswith("tiny:"):
        from harness.tiny import tiny_model_dir

        path = str(tiny_model_dir(model.split(":", 1)[1]))
        return path, path, template or profiles["tiny"].template, "float32"
    if model in profiles:
        prof = profiles[model]
        if not prof.tokenizer:
            raise HarnessError(f"--model {model}: the profile names no base model; pass a hub id or directory")
        return prof.tokenizer, prof.tokenizer, template or prof.template, prof.dtype
    if Path(model).exists():
        return model, model, template, "auto"
    return model, model, template, "bfloat16" if torch.cuda.is_available() else "float32"


def finetune_main(args) -> int:
    """``harness finetune``: build a target (``--split full``) or retain (``--split retainNN``) model.

    Flags read from ``args``: model, split, output, template, epochs, lr, batch_size, per_device_batch,
    warmup_epochs, weight_decay, optimizer, seed, accelerate, gradient_checkpointing, trust_remote_code,
    data_dir (and max_length if present). Writes a Hugging Face checkpoint, ``train_log.jsonl`` and
    ``finetune.yaml`` (the resolved config) to ``--output``.
    """
    from harness.data import load_split
    from harness.formatting import encode_qa
    from harness.io import write_yaml
    from harness.modeling import load_model, load_tokenizer
    from harness.tasks import DataSpec

    split = getattr(args, "split", "full") or "full"
    if split not in TOFU_SPLITS:
        raise HarnessError(f"--split {split!r}: use one of {', '.join(TOFU_SPLITS)}")
    cfg = finetune_config(args)
    weights, tok_src, template, dtype = _finetune_source(args)
    trust = bool(getattr(args, "trust_remote_code", False))
    tok = load_tokenizer(tok_src, trust_remote_code=trust)
    if template is None:
        if not getattr(tok, "chat_template", None):
            raise HarnessError(f"model '{args.model}' has no chat template: pass --template FILE")
        from harness.formatting import Template

        template = Template(apply_chat_template=True)
    rows = load_split(DataSpec(path="locuslab/TOFU", name=split, split="train"), getattr(args, "data_dir", None))
    items = [encode_qa(tok, template, r["question"], r["answer"], max_length=cfg.max_length) for r in rows]
    model = load_model(weights, dtype=dtype, trust_remote_code=trust)
    out = Path(args.output)
    model = finetune(model, tok, items, cfg, desc=f"finetune {split}", out_dir=out, save_dir=out)
    if dist_utils.is_main_process():
        write_yaml(out / "finetune.yaml", {"model": args.model, "split": split, "rows": len(items),
                                           "template": template.to_dict(), "dtype": dtype,
                                           "training": config_dict(cfg), "plan": model.train_info})
        print(f"finetuned {args.model} on TOFU {split} ({len(items)} rows) -> {out}")
    return 0
