"""``harness finetune``: build a target (TOFU ``--split full``) or retain (``--split retainNN``) model with the
recipe a task family declares (task YAML ``finetune:``; ``--task`` picks the family when several offer the split)."""

from __future__ import annotations

import sys
from pathlib import Path

from harness import HarnessError
from harness.data.encode import Template, encode_qa
from harness.data.splits import check_data_dir, load_split
from harness.io import write_yaml
from harness.models.load import load_model, load_tokenizer
from harness.models.profiles import resolve_base_model
from harness.options import FinetuneOptions, tracker_names
from harness.plugins import get_registry
from harness.results.rundir import recover, replacing
from harness.tasks import Task, select, suggest
from harness.training import TrainConfig, config_dict, distributed, finetune
from harness.training.tracking import Trackers, check_trackers


def _whole(name: str, value) -> int:
    if float(value) != int(float(value)):
        raise HarnessError(f"--{name} must be a whole number, got {value}")
    return int(float(value))


def finetune_config(opts: FinetuneOptions) -> TrainConfig:
    """TrainConfig from the flags (defaults: TOFU finetuning, spec 4.1)."""
    cfg = TrainConfig(
        epochs=_whole("epochs", opts.epochs), lr=float(opts.lr), batch_size=int(opts.train_batch_size),
        per_device_batch=int(opts.per_device_batch), warmup_epochs=float(opts.warmup_epochs),
        weight_decay=float(opts.weight_decay), schedule="linear", optimizer=opts.optimizer, seed=int(opts.seed),
        gradient_checkpointing=opts.gradient_checkpointing, max_length=int(opts.max_length),
        accelerate=opts.accelerate or "single",
    )
    cfg.validate()
    return cfg


def recipe_task(opts: FinetuneOptions) -> Task:
    """The task whose ``finetune:`` recipe offers ``--split`` (tasks sharing one recipe count once)."""
    reg = get_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks)
    names = (select(opts.task, reg.tasks, kind="task", tags_of=lambda t: t.tag, failures=reg.failures)
             if opts.task else list(reg.tasks))
    tasks = [reg.tasks[n] for n in names if reg.tasks[n].finetune is not None]
    if not tasks:
        raise HarnessError(f"--task {opts.task}: no finetune: recipe in that task's YAML" if opts.task
                           else "no task declares a finetune: recipe")
    split = opts.split or "full"
    offering: dict = {}
    for t in tasks:
        if split in t.finetune.splits:
            offering.setdefault((t.finetune, t.field_name("question"), t.field_name("answer")), t)
    if not offering:
        known = sorted({s for t in tasks for s in t.finetune.splits})
        raise HarnessError(f"--split {split!r}: use one of {', '.join(known)}{suggest(split, known)}")
    if len(offering) > 1:
        raise HarnessError(f"--split {split!r} is offered by several finetune recipes (tasks "
                           f"{', '.join(t.name for t in offering.values())}): pick one with --task")
    return next(iter(offering.values()))


def main(opts: FinetuneOptions) -> int:
    """Writes a Hugging Face checkpoint, ``train_log.jsonl`` and ``finetune.yaml`` (the resolved config)
    to ``--output``."""
    names = tracker_names(opts.report_to)
    check_trackers(names)  # before the relaunch and any model work
    if opts.accelerate and opts.accelerate != "single":
        rc = distributed.relaunch(sys.argv[1:], opts.accelerate)
        if rc != -1:
            return rc
    split = opts.split or "full"
    task = recipe_task(opts)
    cfg = finetune_config(opts)
    out = Path(opts.output)
    if out.is_dir():
        recover(out, done=finished)  # a killed --overwrite of this directory left the old checkpoint aside
    if is_checkpoint(out) and not opts.overwrite:
        raise HarnessError(f"--output {out} already holds a checkpoint; pass --overwrite to replace it "
                           "(it is kept until the new one is saved) or choose another directory")
    check_data_dir({"train": task.finetune.spec(split)}, opts.data_dir, what=f"finetune --split {split}")
    choice = resolve_base_model(opts.model, opts.template)
    tok = load_tokenizer(choice.tokenizer_path(), trust_remote_code=opts.trust_remote_code)
    template = choice.template
    if template is None:
        if not getattr(tok, "chat_template", None):
            raise HarnessError(f"model '{opts.model}' has no chat template: pass --template FILE")
        template = Template(apply_chat_template=True)
    spec = task.finetune.spec(split)
    q, a = task.field_name("question"), task.field_name("answer")
    rows = load_split(spec, opts.data_dir)
    if rows and (q not in rows[0] or a not in rows[0]):
        raise HarnessError(f"{task.file}: finetune data {spec.label()} has no field '{q if q not in rows[0] else a}' "
                           f"(fields: {', '.join(rows[0])}); fix prompt.question/prompt.answer")
    items = [encode_qa(tok, template, r[q], r[a], max_length=cfg.max_length) for r in rows]
    model = load_model(choice.start_path(), dtype=choice.dtype, trust_remote_code=opts.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out, opts.overwrite, done=finished):
        tracker = None  # made inside: --overwrite first moves the old files (old logs too) aside
        if names and distributed.is_main_process():
            tracker = Trackers(names, run_name=out.name, log_dir=out, project=opts.tracker_project,
                               config={"model": opts.model, "split": split, "data": spec.label(),
                                       "training": config_dict(cfg)})
        try:
            result = finetune(model, tok, items, cfg, desc=f"finetune {split}", out_dir=out, save_dir=out,
                              tracker=tracker)
        finally:
            if tracker is not None:
                tracker.finish()
        if distributed.is_main_process():
            # written last: marks the checkpoint finished (and lets --overwrite drop the old one)
            write_yaml(out / FINISHED, {"model": opts.model, "split": split, "data": spec.label(),
                                        "rows": len(items), "template": template.to_dict(), "dtype": choice.dtype,
                                        "training": config_dict(cfg), "plan": result.info})
            print(f"finetuned {opts.model} on {task.benchmark} {split} ({len(items)} rows) -> {out}")
    return 0


FINISHED = "finetune.yaml"


def is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file()


def finished(d: Path) -> bool:
    """A checkpoint ``harness finetune`` completed, or one from elsewhere (``--overwrite`` replaces either)."""
    return is_checkpoint(d) and ((d / FINISHED).is_file() or not (d / "train_log.jsonl").exists())
