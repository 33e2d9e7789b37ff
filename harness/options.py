"""Typed options of each CLI verb: ``harness.cli`` turns argv into one of these once; everything below
``harness.commands`` receives plain values, never a parsed namespace. Each default lives here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from harness import HarnessError

EVAL_BATCH_SIZE = 32  # scoring batch (the reference evaluator's)
LIST_KINDS = ("all", "tasks", "methods", "metrics", "attacks", "models", "plugins")  # what `harness ls` lists
LAUNCHERS = ("local", "slurm")  # --launcher: submitit's LocalExecutor or SlurmExecutor
SLURM_TIME = "4:00:00"  # --slurm-time default (per array task)
# the sweep selection keeps points whose utility is at least this fraction of the Finetuned row's
UTILITY_FRACTION = 0.9
ATTENTION_MASKS = ("reference", "corrected")  # reference: ids != pad as published; corrected: padding only
TRACKER_PROJECT = "unlearn-harness"  # --tracker-project default (W&B project, MLflow experiment)


def _positive(flag: str, value, *, integer: bool = False, key: str | None = None) -> None:
    """``None`` (not given) passes. ``key``: the training field the flag sets, named as the training config
    names it when the value is not finite."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        what = f"training.{key}" if key else flag
        raise HarnessError(f"{what} must be a finite number, got {value} (from {flag})")
    if integer and float(value) != int(value):
        raise HarnessError(f"{flag} must be a whole number, got {value}")
    if value <= 0:
        raise HarnessError(f"{flag} must be positive, got {value}")


def _non_negative(flag: str, value) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise HarnessError(f"{flag} must be a finite number >= 0, got {value}")


def items(flag: str, text: str) -> list[str]:
    """A comma separated flag value as a non-empty list without duplicates."""
    out = [x.strip() for x in str(text).split(",")]
    if not any(out):
        raise HarnessError(f"{flag} {text!r}: give at least one name")
    if "" in out:
        raise HarnessError(f"{flag} {text!r}: empty item (stray comma)")
    dups = sorted({x for x in out if out.count(x) > 1})
    if dups:
        raise HarnessError(f"{flag} {text!r}: {', '.join(dups)} given more than once")
    return out


def numbers(flag: str, value, *, integer: bool = False, key: str | None = None) -> list[float] | None:
    """A numeric flag that may sweep: ``5e-4`` or ``1e-5,2e-5,5e-5`` -> [floats], each checked as the flag's
    single value is (finite, positive, whole where ``integer``); ``None`` when not given."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        parts = [value]
    elif isinstance(value, (list, tuple)):  # a sweep file's list
        parts = list(value)
    else:
        parts = items(flag, value)
    out = []
    for part in parts:
        try:
            number = float(part)
        except (TypeError, ValueError):
            raise HarnessError(f"{flag} {value!r}: {part!r} is not a number") from None
        _positive(flag, number, integer=integer, key=key)
        if number in out:  # 1e-3,0.001: one configuration twice
            raise HarnessError(f"{flag} {value!r}: {part} is given more than once")
        out.append(number)
    return out


def slurm_mem(text: str | None) -> str | None:
    """Slurm's --mem syntax: a positive whole number with an optional K/M/G/T unit (megabytes without)."""
    if text is None:
        return None
    s = str(text).strip()
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", s, re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise HarnessError(f"--slurm-mem {text!r}: use Slurm's syntax, a positive size such as 64G or 16000M")
    return f"{int(m.group(1))}{m.group(2).upper()}"


def slurm_minutes(text: str) -> int:
    """Slurm's --time syntax (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (seconds round up)."""
    s = str(text).strip()
    try:
        days, rest = s.split("-", 1) if "-" in s else ("0", s)
        parts = [int(p) for p in rest.split(":")]
        if "-" in s and len(parts) <= 3:
            h, m, sec = (parts + [0, 0])[:3]
        elif len(parts) in (1, 2):
            h, m, sec = 0, parts[0], (parts + [0])[1]
        elif len(parts) == 3:
            h, m, sec = parts
        else:
            raise ValueError
        if min(int(days), h, m, sec) < 0:
            raise ValueError
        minutes = int(days) * 1440 + h * 60 + m + (1 if sec else 0)
    except ValueError:
        raise HarnessError(f"--slurm-time {text!r}: use Slurm's syntax, e.g. 90, 4:00:00 or 1-12:00:00") from None
    if minutes <= 0:
        raise HarnessError(f"--slurm-time {text!r}: must be positive")
    return minutes
def tracker_names(report_to: str | None) -> list[str]:
    """``--report-to`` as tracker names (``none`` or not given: no tracking)."""
    if not report_to or report_to.strip() == "none":
        return []
    return items("--report-to", report_to)


def eval_every_value(text) -> int | float | None:
    """``--eval-every``: whole optimizer steps (``10``, an int) or a fraction of an epoch below 1 (``0.25``)."""
    if text is None:
        return None
    s = str(text).strip()
    try:
        steps = int(s)
    except ValueError:
        steps = None
    if steps is not None:
        if steps <= 0:
            raise HarnessError(f"--eval-every must be positive, got {text}")
        return steps
    try:
        frac = float(s)
    except ValueError:
        raise HarnessError(f"--eval-every {text!r}: give optimizer steps (e.g. 10) or a fraction of an epoch "
                           "(e.g. 0.25)") from None
    if not math.isfinite(frac) or frac <= 0:
        raise HarnessError(f"--eval-every must be positive, got {text}")
    if frac >= 1:
        raise HarnessError(f"--eval-every {text}: a fraction of an epoch must be below 1; give whole optimizer "
                           "steps as an integer (e.g. 10)")
    return frac


def keep_best_parts(text: str) -> tuple[str | None, str]:
    """``--keep-best [min:|max:]METRIC`` -> (direction or None for the metric's own, metric name)."""
    s = str(text).strip()
    direction, sep, name = s.rpartition(":")
    if not sep:
        direction, name = None, s
    elif direction not in ("min", "max"):
        raise HarnessError(f"--keep-best {text!r}: the prefix is min: or max:, not {direction}:")
    if not name.strip():
        raise HarnessError(f"--keep-best {text!r}: name a metric, e.g. forget_Q_A_Prob or max:forget_quality")
    return direction, name.strip()


def _during_training(eval_every, eval_metrics, keep_best) -> None:
    eval_every_value(eval_every)
    if eval_metrics is not None:
        items("--eval-metrics", eval_metrics)
    if keep_best is not None:
        keep_best_parts(keep_best)
    for flag, value in (("--eval-metrics", eval_metrics), ("--keep-best", keep_best)):
        if value is not None and eval_every is None:
            raise HarnessError(f"{flag} needs --eval-every N (optimizer steps, or a fraction of an epoch like 0.25)")


def _trackers(report_to: str | None, project: str) -> None:
    tracker_names(report_to)
    if not str(project).strip():
        raise HarnessError("--tracker-project: give a name")


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
    shared_prefix: bool = True  # --no-shared-prefix: one full pass per answer of an option set
    attacks: str | None = None  # comma separated attack names (harness ls attacks)
    attack_set: list[str] = field(default_factory=list)  # ATTACK.FIELD=VALUE settings of the --attacks
    # the lm_eval metric's arguments (None: the task file's); utility adds lm-eval tasks to any task
    utility: str | None = None
    lm_eval_tasks: str | None = None
    lm_eval_num_fewshot: int | None = None
    lm_eval_limit: float | None = None
    lm_eval_batch_size: int | None = None
    lm_eval_chat_template: bool | None = None
    lm_eval_include: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Checks of the values alone, before any work starts (files: the commands' input checks)."""
        if self.attacks is not None:
            items("--attacks", self.attacks)
        if self.attack_set and not self.attacks:
            raise HarnessError(f"--attack-set {self.attack_set[0]!r}: give the attack in --attacks too")
        _positive("--max-length", self.max_length, integer=True)
        _positive("--limit", self.limit, integer=True)
        for flag, value in (("--utility", self.utility), ("--lm-eval-tasks", self.lm_eval_tasks)):
            if value is not None:
                items(flag, value)
        if self.lm_eval_num_fewshot is not None and self.lm_eval_num_fewshot < 0:
            raise HarnessError(f"--lm-eval-num-fewshot must be >= 0, got {self.lm_eval_num_fewshot}")
        _positive("--lm-eval-limit", self.lm_eval_limit)
        _positive("--lm-eval-batch-size", self.lm_eval_batch_size, integer=True)

    def lm_eval_overrides(self) -> dict:
        """The lm_eval metric settings given on the command line (``harness.metrics.lmeval.with_overrides``)."""
        limit = self.lm_eval_limit
        if limit is not None and limit >= 1 and float(limit).is_integer():
            limit = int(limit)
        return {"tasks": items("--lm-eval-tasks", self.lm_eval_tasks) if self.lm_eval_tasks else None,
                "utility": items("--utility", self.utility) if self.utility else None,
                "include": list(self.lm_eval_include), "num_fewshot": self.lm_eval_num_fewshot, "limit": limit,
                "batch_size": self.lm_eval_batch_size, "apply_chat_template": self.lm_eval_chat_template}
        if self.attention_mask not in ATTENTION_MASKS:
            raise HarnessError(f"--attention-mask {self.attention_mask!r}: use one of {', '.join(ATTENTION_MASKS)}")


def attack_names(opts: ModelOptions) -> list[str]:
    """``--attacks`` as a list (empty when not given)."""
    return items("--attacks", opts.attacks) if opts.attacks else []


@dataclass
class PeftOptions:
    """Parameter-efficient training (``run`` and ``finetune``): ``peft`` is ``lora`` or a PEFT config file."""

    peft: str | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target_modules: str | None = None
    merge: bool = False
    load_in_4bit: bool = False

    def validate_peft(self) -> None:
        _positive("--lora-r", self.lora_r, integer=True)
        _positive("--lora-alpha", self.lora_alpha)
        if self.lora_dropout is not None and not (math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise HarnessError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None:
            items("--lora-target-modules", self.lora_target_modules)
        if not self.peft:
            for flag, value in (("--merge", self.merge), ("--load-in-4bit", self.load_in_4bit)):
                if value:
                    raise HarnessError(f"{flag} needs --peft lora (or --peft CONFIG_FILE)")
        if self.merge and self.load_in_4bit:
            raise HarnessError("--merge with --load-in-4bit would merge into 4-bit weights; train with "
                               "--load-in-4bit, then merge the saved adapter into a bf16 base")


@dataclass
class EvalOptions(Common, ModelOptions):
    tasks: str = ""
    output: str = "results"
    name: str = "eval"
    retain_model: bool = False
    eval_batch_size: int = EVAL_BATCH_SIZE
    overwrite: bool = False
    accelerate: str | None = None  # ddp|zero3|FILE: re-launch; every process scores a shard of the rows

    def validate(self) -> None:
        ModelOptions.validate(self)
        items("--tasks", self.tasks)
        _positive("--eval-batch-size", self.eval_batch_size, integer=True)


@dataclass
class RunOptions(Common, ModelOptions, PeftOptions):
    tasks: str = ""
    methods: str = ""
    set: list[str] = field(default_factory=list)
    seeds: str = "0"
    output: str = "results"
    accelerate: str | None = None
    epochs: float | str | None = None  # one value or a comma separated sweep ("5,10")
    max_steps: int | None = None
    lr: float | str | None = None  # one value or a comma separated sweep ("1e-5,2e-5")
    sweep: str | None = None  # YAML file: key -> list of values (commands/sweep.py)
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
    cell: list[str] = field(default_factory=list)  # run only these cells (<model>/<task>/<method>/<hash8>-s<seed>)
    launcher: str | None = None  # None: in this process; local / slurm: submitit job array
    slurm_partition: str | None = None
    slurm_gpus_per_node: int | None = None
    slurm_time: str = SLURM_TIME
    slurm_array_parallelism: int | None = None
    slurm_setup: list[str] = field(default_factory=list)
    slurm_mem: str | None = None  # Slurm's --mem per node, e.g. 64G
    slurm_cpus_per_task: int | None = None
    report_to: str | None = None  # accelerate tracker names, comma separated (e.g. tensorboard,wandb)
    tracker_project: str = TRACKER_PROJECT
    push_to_hub: str | None = None  # REPO_ID; may hold {task} {method} {seed} for a grid
    private: bool = False
    # scoring during training (docs/running.md): steps or a fraction of an epoch; metric subset; [min:|max:]METRIC
    eval_every: str | None = None
    eval_metrics: str | None = None
    keep_best: str | None = None

    def validate(self) -> None:
        ModelOptions.validate(self)
        items("--tasks", self.tasks)
        items("--methods", self.methods)
        _trackers(self.report_to, self.tracker_project)
        _during_training(self.eval_every, self.eval_metrics, self.keep_best)
        if self.private and not self.push_to_hub:
            raise HarnessError("--private applies to --push-to-hub REPO_ID; give the repository too")
        if self.push_to_hub is not None and not self.push_to_hub.strip():
            raise HarnessError("--push-to-hub: give a repository id, e.g. my-name/tofu-npo")
        try:
            seeds = [int(s) for s in items("--seeds", self.seeds)]
        except ValueError:
            raise HarnessError(f"--seeds {self.seeds!r}: expected comma separated integers") from None
        if len(set(seeds)) != len(seeds):  # 1,01
            raise HarnessError(f"--seeds {self.seeds!r}: a seed is given more than once")
        numbers("--epochs", self.epochs, integer=True, key="epochs")
        _positive("--max-steps", self.max_steps, integer=True, key="max_steps")
        numbers("--lr", self.lr, key="lr")
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise HarnessError(f"--launcher {self.launcher!r}: use one of {', '.join(LAUNCHERS)}")
        slurm_minutes(self.slurm_time)
        _positive("--slurm-gpus-per-node", self.slurm_gpus_per_node, integer=True)
        _positive("--slurm-array-parallelism", self.slurm_array_parallelism, integer=True)
        _positive("--slurm-cpus-per-task", self.slurm_cpus_per_task, integer=True)
        slurm_mem(self.slurm_mem)
        _positive("--train-batch-size", self.train_batch_size, integer=True)
        _positive("--per-device-batch", self.per_device_batch, integer=True)
        _positive("--eval-batch-size", self.eval_batch_size, integer=True)
        self.validate_peft()
        if self.merge and not (self.save_model or self.push_to_hub):
            raise HarnessError("--merge needs --save-model (it writes the merged checkpoint to the run directory)")

    def seed_list(self) -> list[int]:
        return [int(s) for s in items("--seeds", self.seeds)]

    def baseline(self, task: str, name: str = "finetuned") -> EvalOptions:
        """The eval of the start model (the Finetuned row) with this run's model and scoring options."""
        keep = {f: getattr(self, f) for f in (*ModelOptions.__dataclass_fields__, *Common.__dataclass_fields__,
                                              "output", "eval_batch_size")}
        return EvalOptions(**keep, tasks=task, name=name)


    def launch_argv(self) -> list[str]:
        """The ``harness run`` flags that rebuild this grid in a job (``--launcher`` and where to submit left out)."""
        skip = {"launcher", "cell", "dry_run", "shard", *(f for f in self.__dataclass_fields__ if f.startswith("slurm_"))}
        return to_argv(self, skip)


def to_argv(opts, skip=()) -> list[str]:
    """The long flags that parse back into ``opts`` (every field is the flag of the same name; fields at
    their default are left out)."""
    default = type(opts)()
    out: list[str] = []
    for name in opts.__dataclass_fields__:
        value = getattr(opts, name)
        if name in skip or value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # store_true flags, and store_false ones named --no-FIELD (--no-shared-prefix)
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            for v in value:
                out.append(f"{flag}={v}")
        else:
            out.append(f"{flag}={value}")
    return out


@dataclass
class FinetuneOptions(Common, PeftOptions):
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
    overwrite: bool = False
    report_to: str | None = None
    tracker_project: str = TRACKER_PROJECT

    def validate(self) -> None:
        _trackers(self.report_to, self.tracker_project)
        _positive("--epochs", self.epochs, integer=True)
        _positive("--lr", self.lr)
        _positive("--train-batch-size", self.train_batch_size, integer=True)
        _positive("--per-device-batch", self.per_device_batch, integer=True)
        _positive("--max-length", self.max_length, integer=True)
        _non_negative("--warmup-epochs", self.warmup_epochs)
        _non_negative("--weight-decay", self.weight_decay)
        self.validate_peft()


@dataclass
class ListOptions(Common):
    verb: str = "ls"
    what: str = "all"
    pattern: str = "*"
    tasks: str = "*"


@dataclass
class StatusOptions(Common):
    results: str = "results"


@dataclass
class ReportOptions(Common):
    results: str = "results"
    format: str = "md"
    compare: str | None = None
    plot: str | None = None
    plot_x: str | None = None  # other plot axes than the family's, e.g. mmlu/acc (utility)
    plot_y: str | None = None
    output: str | None = None
    model: str | None = None
    timing: bool = False
    best: str | None = None  # the sweep selection's objective (default: the family's plot y, e.g. forget_quality)
    utility_fraction: float = UTILITY_FRACTION
    export: str | None = None  # the selected sweep table as FILE.csv or FILE.json
    curves: str | None = None  # FILE.png of the metrics logged during training ("" : <results>/curves.png)

    def validate(self) -> None:
        if not math.isfinite(self.utility_fraction) or self.utility_fraction < 0:
            raise HarnessError(f"--utility-fraction must be a finite number >= 0, got {self.utility_fraction}")
        if self.export and not self.export.endswith((".csv", ".json")):
            raise HarnessError(f"--export {self.export!r}: name a .csv or .json file")
        if self.curves and not self.curves.endswith(".png"):
            raise HarnessError(f"--curves {self.curves!r}: name a .png file")
