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
- ``max_steps`` (HF's): exactly that many optimizer steps, epochs repeating as needed (WMDP: 80 steps);
  ``padding_side`` left or right for the training batches (WMDP's collator pads left);
- micro-batch losses are divided by the accumulation steps (the pre-4.46 HF behaviour the published
  numbers used); the last step of an epoch may have fewer micro-batches;
- ``train_log.jsonl``: one line per optimizer step, appended and fsynced as it is written.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import HarnessError
from harness.losses import forward_logits, token_mean_nll
from harness.methods import TrainingState, reference_of, trainable_patterns
from harness.options import EVAL_BATCH_SIZE
from harness.training import adapters
from harness.training import distributed as dist_utils
from harness.training.batching import _pad_id, _to, collate, epoch_order, pairing_generator
from harness.training.config import TrainConfig, plan
from harness.training.optim import build_optimizer, build_scheduler, select_trainable
from harness.training.start_model import StartModel


@dataclass
class TrainResult:
    """What training returns: the trained plain model (eval mode, unsharded) and the derived step counts
    and resolved settings recorded in config.yaml (``plan``)."""

    model: Any
    info: dict


class _StepLog:
    """train_log.jsonl: one JSON line per optimizer step, appended and fsynced (finished lines survive crashes)."""

    def __init__(self, out_dir: Path | None, enabled: bool, tracker=None):
        self.path = Path(out_dir) / "train_log.jsonl" if (out_dir is not None and enabled) else None
        self.tracker = tracker if enabled else None  # ``--report-to``: every row also goes to the trackers
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, row: dict) -> None:
        if self.tracker is not None:
            self.tracker.log_row(row)
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
    trainable: list[str] | None = None,
    state=None,
    tracker=None,
    evaluator=None,
):
    """The loop shared by ``finetune`` and ``unlearn``. Returns a ``TrainResult`` (plain, unsharded model).

    ``trainable``: regexes of the only parameters the optimizer updates (all get gradients). ``state``: the
    method's ``TrainingState`` (kept at the current epoch/step) and its ``log_state`` callable, or ``None``.
    ``tracker``: a ``harness.training.tracking.Trackers`` (main process only) that gets every log row.
    ``evaluator``: a ``harness.training.periodic.PeriodicEval`` (every rank): ``eval/*`` values join the rows of
    the steps it scores (a step-0 row for the start model) and, with keep-best, the best weights are returned."""
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
    deepspeed = dist_utils.is_deepspeed(acc)
    # Gradient accumulation is explicit, as in nanoGPT: each micro-batch loss is divided by ``ga`` (also in
    # an epoch's shorter last step, the pre-4.46 HF behaviour the published numbers used). DeepSpeed's
    # engine divides by its own gradient_accumulation_steps, so there the loss goes in unscaled.
    loss_div = 1 if deepspeed else ga
    acc.gradient_accumulation_steps = ga if deepspeed else 1
    if deepspeed:
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
    if cfg.peft is not None:
        model = adapters.attach(model, cfg.peft, gradient_checkpointing=cfg.gradient_checkpointing)
    model.train()
    only = select_trainable(model, trainable) if trainable is not None else None
    optimizer, resolved_opt = build_optimizer(model, cfg, only)
    info = {**steps, "optimizer": resolved_opt}
    if only is not None:
        total = list(model.named_parameters())
        info["trainable_params"] = {"patterns": list(trainable), "tensors": len(only), "of_tensors": len(total),
                                    "numel": sum(p.numel() for n, p in total if n in only)}
    # counted before ZeRO-3 partitions the parameters (a shard's numel is 0)
    info["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters()
                                       if p.requires_grad and (only is None or n in only))
    if evaluator is not None:
        evaluator.start(steps["total_steps"], steps["steps_per_epoch"], model, only)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg, steps["total_steps"], steps["warmup_steps"])
    if after_prepare is not None:
        after_prepare(acc, pad_id, model)  # e.g. shard the reference model like the policy, precompute log-probs

    log = _StepLog(out_dir, acc.is_main_process, tracker)
    gen = pairing_generator(cfg.seed, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
    bar = tqdm(total=steps["total_steps"], desc=desc, disable=not acc.is_local_main_process, dynamic_ncols=True)
    step = 0
    try:
        if evaluator is not None and evaluator.at_start:
            log.write({"step": 0, "epoch": 0.0, **evaluator(acc, model, 0, 0.0)})
        for epoch in range(steps["epochs"]):
            order = epoch_order(n_anchor, cfg.seed, epoch, rank, world)
            micro = [order[i : i + cfg.per_device_batch] for i in range(0, len(order), cfg.per_device_batch)]
            for start in range(0, len(micro), ga):
                if step >= steps["total_steps"]:  # max_steps reached inside an epoch
                    break
                group = micro[start : start + ga]
                sums: dict[str, float] = {}
                for k, idx in enumerate(group):
                    if state is not None:
                        state[0].epoch, state[0].step = epoch, step
                    batch = {name: _to(part, acc.device) for name, part in make_batch(idx, gen).items()}
                    boundary = k == len(group) - 1
                    acc.sync_gradients = boundary
                    ctx = acc.no_sync(model) if not boundary and not dist_utils.is_deepspeed(acc) else _null()
                    with ctx:
                        loss, parts = loss_fn(model, batch)
                        _check_finite(acc, loss, desc, step + 1, epoch, out_dir)
                        acc.backward(loss / loss_div)
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
                if state is not None:  # the method's state after this step's micro-batches, not averaged
                    means.update({k: _scalar(v) for k, v in state[1]().items()})
                if world > 1:
                    keys = sorted(means)
                    t = torch.tensor([means[k] for k in keys], device=acc.device)
                    t = acc.reduce(t, reduction="mean")
                    means = dict(zip(keys, t.tolist()))
                row = {"step": step, "epoch": round(epoch + (start + len(group)) / len(micro), 4), **means,
                       "grad_norm": None if grad_norm is None else _scalar(grad_norm), "lr": lr}
                if evaluator is not None and evaluator.due(step):
                    row.update(evaluator(acc, model, step, row["epoch"]))
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
    if evaluator is not None:  # with keep-best the final model is the best step's (saved and scored so)
        evaluator.restore(acc, plain)
        info["during_training"] = evaluator.record()
    plain.eval()
    if save_dir is not None:
        save_model(plain, tokenizer, save_dir, is_main=acc.is_main_process)
        acc.wait_for_everyone()
    dist_utils.release(acc)
    return TrainResult(plain, info)


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
    """Save a normal Hugging Face checkpoint (safetensors + config + tokenizer) to ``out``; for an adapted
    model the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``) and the tokenizer."""
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
             out_dir: Path | None = None, save_dir: Path | None = None, accelerator=None, tracker=None,
             evaluator=None):
    """Finetune ``model`` on encoded ``items`` (dicts with ``input_ids`` and ``labels``) with plain NLL.

    The loss is HF's token-mean cross-entropy over each micro-batch. Deterministic for a given
    ``cfg.seed`` (same order, same updates). Returns a ``TrainResult`` (plain model in eval mode);
    ``out_dir`` gets ``train_log.jsonl``, ``save_dir`` a Hugging Face checkpoint.
    """
    items = list(items)
    pad_id = _pad_id(tokenizer)

    def make_batch(idx, _gen):
        return {"train": collate([items[i] for i in idx], pad_id, cfg.attention_mask, cfg.padding_side)}

    def loss_fn(m, batch):
        part = batch["train"]
        return token_mean_nll(forward_logits(m, part), part["labels"]), {}

    return _run(model, tokenizer, cfg, n_anchor=len(items), make_batch=make_batch, loss_fn=loss_fn,
                out_dir=out_dir, desc=desc, accelerator=accelerator, save_dir=save_dir, tracker=tracker,
                evaluator=evaluator)


def method_uses_reference(method) -> bool:
    """Whether ``method`` (an instance, so hyper-parameters count) needs any frozen start model."""
    return reference_of(method) != "none"


def method_batch(forget: Sequence[dict], retain: Sequence[dict] | None, idk: Sequence[dict] | None,
                 pad_id: int, mask: str, side: str = "right", extra: dict[str, Sequence[dict]] | None = None) -> dict:
    """The batch ``method.loss`` gets from already chosen items (each carrying ``index``, idk ones ``alt``);
    ``extra``: the parts a method's prepare step added, one item per forget item."""
    batch = {"forget": collate(forget, pad_id, mask, side)}
    if retain:
        batch["retain"] = collate(retain, pad_id, mask, side)
    if idk:
        batch["idk"] = collate(idk, pad_id, mask, side)
    for name, items in (extra or {}).items():
        batch[name] = collate(items, pad_id, mask, side)
    return batch


def _prepares(method) -> bool:
    from harness.methods import Method

    own = getattr(type(method), "prepare", None)
    return own is not None and own is not Method.prepare


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
    template=None,
    forget_qa: Sequence[tuple[str, str]] | None = None,
    tracker=None,
    evaluator=None,
):
    """Unlearn ``forget_items`` from ``model`` with ``method`` (a ``harness.methods.Method`` instance).

    - ``forget_items``/``retain_items``: encoded items (``input_ids``, ``labels``) in dataset order; the
      anchor is the forget set, each forget example gets a fresh uniformly drawn retain partner.
    - ``idk_items`` (methods with ``uses_idk``): ``idk_items[i]`` is the list of encoded alternatives for
      forget example ``i`` (the forget question with each idk answer, encoded by the caller with the
      model's template); one is drawn uniformly per access from the per-rank generator.
    - ``ref_model``: the frozen reference; default a copy of ``model`` as it is at the start, or with
      ``cfg.peft`` the trained model itself with its adapter disabled (no copy). What is
      kept follows ``reference_of(method)`` only: ``"none"`` makes no copy and ``ref`` is ``None``;
      ``"logprobs"`` precomputes the forget set's log-probs and releases the copy before training (kept
      for idk methods, whose drawn idk pairs are memoised as they come); ``"model"`` keeps it live.
    - ``cache_reference``: memoise reference sequence log-probs; ``False`` recomputes every call (and so
      keeps the frozen model). ``info["reference_forwards"]`` counts the reference forwards run.
    - ``out_dir``: gets ``train_log.jsonl``; ``save_dir``: a Hugging Face checkpoint of the result;
      ``tracker``: ``--report-to`` trackers (``harness.training.tracking.Trackers``) that get each log row;
      ``evaluator``: scoring during training and keep-best (``harness.training.periodic.PeriodicEval``).
    - ``template``/``forget_qa``: the prompt template and the forget ``(question, answer)`` texts, for a
      method's prepare step (``Method.prepare``, run on the start model before training; what it builds is
      cached in ``out_dir/prepare/``). Its ``"forget"`` part replaces ``forget_items``, other parts join
      every batch under their names (reference log-probs of each are precomputed like the forget set's).
    Batches given to ``method.loss`` are ``{"forget", "retain"[, "idk"]}`` parts with ``input_ids``,
    ``attention_mask``, ``labels`` and ``index`` (idk parts also ``alt``, the drawn alternative).
    Returns a ``TrainResult``: the unlearned plain model in eval mode and the derived step counts.
    """
    extra: dict[str, list[dict]] = {}
    if _prepares(method):
        from harness.training.prepare import Preparation, run_prepare

        accelerator = accelerator or dist_utils.make_accelerator(cfg.accelerate)
        start = Preparation(model, tokenizer, list(forget_items), qa=list(forget_qa) if forget_qa else None,
                            template=template, seed=cfg.seed, batch_size=EVAL_BATCH_SIZE,
                            cache_dir=Path(out_dir) / "prepare" if out_dir is not None else None,
                            max_length=cfg.max_length, accelerator=accelerator)
        extra = run_prepare(method, start)
        forget_items = extra.pop("forget", forget_items)
        extra = {name: [{**it, "index": i} for i, it in enumerate(items)] for name, items in extra.items()}
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
    kind = reference_of(method)
    needs_ref = kind != "none"
    ref_holder: dict[str, StartModel] = {}
    start_ref = ref_model
    through_adapter = needs_ref and start_ref is None and cfg.peft is not None
    if needs_ref and start_ref is None and not through_adapter:
        # Copied before the policy is prepared: ZeRO-3 partitions the policy's parameters in place.
        start_ref = copy.deepcopy(model)

    def make_batch(idx, gen):
        partners = alts = None
        if retain:
            partners = [retain[j] for j in torch.randint(0, len(retain), (len(idx),), generator=gen).tolist()]
        if uses_idk:
            alts = []
            for i in idx:
                j = int(torch.randint(0, len(idk_items[i]), (1,), generator=gen))
                alts.append({**idk_items[i][j], "index": i, "alt": j})
        return method_batch([forget[i] for i in idx], partners, alts, pad_id, mask, cfg.padding_side,
                            {name: [items[i] for i in idx] for name, items in extra.items()})

    def loss_fn(m, batch):
        out = method.loss(m, batch, ref_holder.get("ref"))
        if isinstance(out, tuple):
            return out[0], dict(out[1])
        return out, {}

    def after_prepare(acc, pad, policy):
        nonlocal start_ref
        if not needs_ref:
            return
        if through_adapter:  # the policy's own base weights, frozen by peft and sharded with it
            ref_net = acc.unwrap_model(policy)
        else:
            ref_net = dist_utils.prepare_reference(acc, start_ref)
        start_ref = None  # StartModel holds the only reference, so releasing it frees the copy
        ref = StartModel(ref_net, cache=cache_reference, keep_model=kind == "model" or uses_idk,
                         allow_logits=kind == "model", accelerator=acc, disable_adapter=through_adapter)
        for name, items in {"forget": forget, **extra}.items():
            ref.precompute(items, name, pad_id=pad, batch_size=cfg.per_device_batch, mask=mask)
        if cache_reference:
            ref.release_model()
        ref_holder["ref"] = ref

    def after_prepare_all(acc, pad, policy):
        after_prepare(acc, pad, policy)
        run_state.world_size = acc.num_processes
        if hasattr(method, "setup"):  # an object with only loss() (older plugins) has no state
            method.setup(run_state)

    run_state = TrainingState(seed=cfg.seed)
    log_state = getattr(method, "log_state", lambda: {})
    result = _run(model, tokenizer, cfg, n_anchor=len(forget), make_batch=make_batch, loss_fn=loss_fn,
                  out_dir=out_dir, desc=desc or f"unlearn {method.name}", accelerator=accelerator,
                  after_prepare=after_prepare_all, save_dir=save_dir, trainable=trainable_patterns(method),
                  state=(run_state, log_state), tracker=tracker, evaluator=evaluator)
    result.info["method_seed"] = cfg.seed  # the method's generator is harness.methods.method_generator(seed)
    if run_state.records:
        result.info["method_records"] = dict(run_state.records)
    result.info["reference"] = kind
    if needs_ref:
        result.info["reference_source"] = "disabled adapter" if through_adapter else "frozen copy"
    if "ref" in ref_holder:
        result.info["reference_forwards"] = ref_holder["ref"].forwards
        result.info["reference_released"] = ref_holder["ref"].model is None
    ref_holder.clear()
    return result
