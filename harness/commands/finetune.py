"""``harness finetune``: build a TOFU target (``--split full``) or retain (``--split retainNN``) model."""

from __future__ import annotations

import sys
from pathlib import Path

from harness import HarnessError
from harness.data.encode import Template, encode_qa
from harness.data.splits import check_data_dir, load_split
from harness.io import write_yaml
from harness.models.load import load_model, load_tokenizer
from harness.models.profiles import resolve_base_model
from harness.options import FinetuneOptions
from harness.results.rundir import recover, replacing
from harness.tasks import DataSpec
from harness.training import TrainConfig, config_dict, distributed, finetune

TOFU_SPLITS = ("full", "retain99", "retain95", "retain90", "forget01", "forget05", "forget10")


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


def main(opts: FinetuneOptions) -> int:
    """Writes a Hugging Face checkpoint, ``train_log.jsonl`` and ``finetune.yaml`` (the resolved config)
    to ``--output``."""
    if opts.accelerate and opts.accelerate != "single":
        rc = distributed.relaunch(sys.argv[1:], opts.accelerate)
        if rc != -1:
            return rc
    split = opts.split or "full"
    if split not in TOFU_SPLITS:
        raise HarnessError(f"--split {split!r}: use one of {', '.join(TOFU_SPLITS)}")
    cfg = finetune_config(opts)
    out = Path(opts.output)
    if out.is_dir():
        recover(out, done=finished)  # a killed --overwrite of this directory left the old checkpoint aside
    if is_checkpoint(out) and not opts.overwrite:
        raise HarnessError(f"--output {out} already holds a checkpoint; pass --overwrite to replace it "
                           "(it is kept until the new one is saved) or choose another directory")
    spec = DataSpec(path="locuslab/TOFU", name=split, split="train")
    check_data_dir({"train": spec}, opts.data_dir, what=f"finetune --split {split}")
    choice = resolve_base_model(opts.model, opts.template)
    tok = load_tokenizer(choice.tokenizer_path(), trust_remote_code=opts.trust_remote_code)
    template = choice.template
    if template is None:
        if not getattr(tok, "chat_template", None):
            raise HarnessError(f"model '{opts.model}' has no chat template: pass --template FILE")
        template = Template(apply_chat_template=True)
    rows = load_split(spec, opts.data_dir)
    items = [encode_qa(tok, template, r["question"], r["answer"], max_length=cfg.max_length) for r in rows]
    model = load_model(choice.start_path(), dtype=choice.dtype, trust_remote_code=opts.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out, opts.overwrite, done=finished):
        result = finetune(model, tok, items, cfg, desc=f"finetune {split}", out_dir=out, save_dir=out)
        if distributed.is_main_process():
            # written last: marks the checkpoint finished (and lets --overwrite drop the old one)
            write_yaml(out / FINISHED, {"model": opts.model, "split": split, "rows": len(items),
                                        "template": template.to_dict(), "dtype": choice.dtype,
                                        "training": config_dict(cfg), "plan": result.info})
            print(f"finetuned {opts.model} on TOFU {split} ({len(items)} rows) -> {out}")
    return 0


FINISHED = "finetune.yaml"


def is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file()


def finished(d: Path) -> bool:
    """A checkpoint ``harness finetune`` completed, or one from elsewhere (``--overwrite`` replaces either)."""
    return is_checkpoint(d) and ((d / FINISHED).is_file() or not (d / "train_log.jsonl").exists())
