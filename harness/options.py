"""Typed options of each CLI verb: ``harness.cli`` turns argv into one of these once; everything below
``harness.commands`` receives plain values, never a parsed namespace. Each default lives here."""

from __future__ import annotations

from dataclasses import dataclass, field

EVAL_BATCH_SIZE = 32  # scoring batch (the reference evaluator's)
LIST_KINDS = ("all", "tasks", "methods", "metrics", "models", "plugins")  # what `harness ls` lists
ATTENTION_MASKS = ("reference", "corrected")  # reference: ids != pad as published; corrected: padding only


@dataclass
class Common:
    include_tasks: list[str] = field(default_factory=list)
    plugins_dir: list[str] = field(default_factory=list)
    debug: bool = False
    verbose: bool = False


@dataclass
class ModelOptions:
    model: str | None = None
    template: str | None = None
    reference: str | None = None
    data_dir: str | None = None
    trust_remote_code: bool = False
    max_length: int | None = None
    attention_mask: str = "reference"
    limit: int | None = None


@dataclass
class EvalOptions(Common, ModelOptions):
    tasks: str = ""
    output: str = "results"
    name: str = "eval"
    retain_model: bool = False
    eval_batch_size: int = EVAL_BATCH_SIZE
    overwrite: bool = False


@dataclass
class RunOptions(Common, ModelOptions):
    tasks: str = ""
    methods: str = ""
    set: list[str] = field(default_factory=list)
    seeds: str = "0"
    output: str = "results"
    accelerate: str | None = None
    epochs: float | None = None
    lr: float | None = None
    train_batch_size: int | None = None
    per_device_batch: int | None = None
    eval_batch_size: int = EVAL_BATCH_SIZE
    optimizer: str | None = None
    gradient_checkpointing: bool = False
    save_model: bool = False
    no_cache_reference: bool = False
    dry_run: bool = False
    overwrite: bool = False
    shard: str | None = None

    def baseline(self, task: str, name: str = "finetuned") -> EvalOptions:
        """The eval of the start model (the Finetuned row) with this run's model and scoring options."""
        keep = {f: getattr(self, f) for f in (*ModelOptions.__dataclass_fields__, *Common.__dataclass_fields__,
                                              "output", "eval_batch_size")}
        return EvalOptions(**keep, tasks=task, name=name)


@dataclass
class FinetuneOptions(Common):
    model: str = ""
    split: str = "full"
    task: str | None = None  # whose finetune: recipe; default: the one recipe offering --split
    output: str = ""
    template: str | None = None
    epochs: float = 5
    lr: float = 1e-5
    train_batch_size: int = 32
    per_device_batch: int = 4
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    optimizer: str = "paged_adamw_32bit"
    seed: int = 0
    accelerate: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    data_dir: str | None = None
    max_length: int = 512


@dataclass
class ListOptions(Common):
    verb: str = "ls"
    what: str = "all"
    pattern: str = "*"
    tasks: str = "*"


@dataclass
class ReportOptions(Common):
    results: str = "results"
    format: str = "md"
    compare: str | None = None
    plot: str | None = None
    output: str | None = None
    model: str | None = None
    timing: bool = False
