"""Command line: argparse turns argv into the verb's typed options (``harness.options``) once; each verb's
work lives in ``harness.commands.<verb>``."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import sys

from harness import HarnessError, __version__
from harness.options import (
    ATTENTION_MASKS,
    LAUNCHERS,
    LIST_KINDS,
    SLURM_TIME,
    UTILITY_FRACTION,
    EvalOptions,
    FinetuneOptions,
    ListOptions,
    ReportOptions,
    RunOptions,
    StatusOptions,
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-tasks", action="append", metavar="DIR", help="extra task YAML directory (repeatable)")
    p.add_argument("--plugins-dir", action="append", metavar="DIR", help="load loose plugin .py files from DIR (repeatable)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model profile name (harness ls models), hub id or local directory")
    p.add_argument("--template", metavar="FILE", help="YAML with open-unlearning template_args (for hub ids / directories)")
    p.add_argument("--reference", metavar="DIR|LOG",
                   help="retain model dir/id or *_EVAL.json / *_SUMMARY.json log; with several tasks it must contain {task} or {split}")
    p.add_argument("--data-dir", metavar="DIR", help="local copies of dataset splits as <name>/<split>.jsonl")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint (off by default)")
    p.add_argument("--max-length", type=int, help="override the task's max sequence length")
    p.add_argument("--attention-mask", choices=list(ATTENTION_MASKS),
                   help="reference: attention_mask = ids != pad as the published numbers (pad = eos hides eos tokens); corrected: mask padding only")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N rows of each split (smoke tests; marks results partial)")
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="score every answer of an option set (perturbed answers) with its own full pass instead of "
                        "reusing the question's KV cache (same numbers up to float rounding; slower)")
    p.add_argument("--attacks", metavar="NAME[,NAME]",
                   help="score the task's forget metrics again after each attack, e.g. quant4,relearn (harness ls attacks)")
    p.add_argument("--attack-set", action="append", metavar="ATTACK.FIELD=VALUE",
                   help="an attack's setting, e.g. relearn.epochs=4 or quant4.quant_type=fp4 (repeatable; recorded "
                        "and part of the run hash; settings: harness ls attacks)")
    _lm_eval_args(p)


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lm-evaluation-harness (metric lm_eval; needs the lmeval extra)")
    g.add_argument("--utility", metavar="TASKS", help="add lm-eval utility tasks (e.g. mmlu) to every selected task's scores")
    g.add_argument("--lm-eval-tasks", metavar="TASKS", help="replace the lm-eval task list of the tasks' lm_eval metric")
    g.add_argument("--lm-eval-num-fewshot", type=int, metavar="N", help="lm-eval few-shot count")
    g.add_argument("--lm-eval-limit", type=float, metavar="N", help="lm-eval: first N docs per task (<1: a fraction)")
    g.add_argument("--lm-eval-batch-size", type=int, metavar="N", help="lm-eval batch size (default: the scoring batch)")
    g.add_argument("--lm-eval-chat-template", action=argparse.BooleanOptionalAction,
                   help="render lm-eval prompts with the tokenizer's chat template")
    g.add_argument("--lm-eval-include", action="append", metavar="DIR",
                   help="directory of your own lm-eval task YAML files (repeatable)")


class _Deprecated(argparse.Action):
    """``--batch-size``: the old name of the flag ``dest`` now has; says so once and sets it."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"notice: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-batch-size", type=int,
                   help="effective (global) training batch size")
    p.add_argument("--batch-size", dest="train_batch_size", type=int, action=_Deprecated, help=argparse.SUPPRESS)


def _eval_batch_arg(p: argparse.ArgumentParser, *, alias: bool = False) -> None:
    p.add_argument("--eval-batch-size", type=int, help="scoring batch size")
    if alias:
        p.add_argument("--batch-size", dest="eval_batch_size", type=int, action=_Deprecated, help=argparse.SUPPRESS)


def _peft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peft", metavar="lora|FILE",
                   help="train an adapter only (peft): 'lora' with the --lora-* settings, or a PEFT config file "
                        "(JSON/YAML with peft_type, or a directory with adapter_config.json)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-target-modules", metavar="NAMES",
                   help="comma separated module names (default: every Llama linear layer, q_proj,...,down_proj)")
    p.add_argument("--merge", action="store_true",
                   help="also save the adapter merged into the base weights as a plain checkpoint")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: load the base model in 4-bit nf4 (CUDA, bitsandbytes)")


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", metavar="TRACKERS",
                   help="log training to accelerate trackers, comma separated: tensorboard, wandb, mlflow, ... "
                        "(default none; pip install 'unlearn-harness[tracking]')")
    p.add_argument("--tracker-project", metavar="NAME", help="W&B project / MLflow experiment (default unlearn-harness)")


OPTIONS = {"run": RunOptions, "eval": EvalOptions, "finetune": FinetuneOptions, "ls": ListOptions,
           "validate": ListOptions, "report": ReportOptions, "status": StatusOptions}


def parse_options(argv: list[str]):
    """argv -> the verb's options (what ``main`` runs with)."""
    return to_options(build_parser().parse_args(list(map(str, argv))))


def to_options(args: argparse.Namespace):
    """The verb's options dataclass from the parsed namespace (every field the parser defines)."""
    cls = OPTIONS[args.verb]
    names = cls.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in names}
    unknown = set(vars(args)) - set(names) - {"verb"}
    if unknown:  # a flag without a typed home would silently do nothing
        raise HarnessError(f"internal: flags {sorted(unknown)} of '{args.verb}' have no field in {cls.__name__}")
    opts = cls(**given)
    if isinstance(opts, ListOptions):
        opts.verb = args.verb
    validate = getattr(opts, "validate", None)
    if validate is not None:  # every flag value is checked here, before any work starts
        validate()
    return opts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description="Unlearn LLMs and measure what they forgot and kept.")
    ap.add_argument("--version", action="version", version=f"unlearn-harness {__version__}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    # Flags not given are left out of the namespace: every default lives in the verb's options dataclass.
    sub.add_parser = functools.partial(sub.add_parser, argument_default=argparse.SUPPRESS)

    p = sub.add_parser("ls", help="list tasks, methods, metrics, models, plugins")
    # no argparse choices: with a suppressed default, Python 3.11 checks the default against them
    p.add_argument("what", nargs="?", metavar="{" + ",".join(LIST_KINDS) + "}")
    p.add_argument("pattern", nargs="?")
    _common(p)

    p = sub.add_parser("validate", help="load every plugin and task strictly and report problems")
    p.add_argument("-t", "--tasks")
    _common(p)

    p = sub.add_parser("run", help="unlearn and score: task x method x seed")
    p.add_argument("-t", "--tasks", required=True, help="names, fnmatch patterns or tags, comma separated")
    p.add_argument("-m", "--methods", required=True, help="method names, comma separated")
    p.add_argument("--set", action="append", metavar="METHOD.FIELD=VALUE",
                   help="method hyper-parameter override (repeatable); a comma list sweeps it: npo.beta=0.05,0.1")
    p.add_argument("--seeds", help="comma separated seeds")
    p.add_argument("-o", "--output")
    p.add_argument("--accelerate", metavar="single|ddp|zero3|FILE", help="re-launch under accelerate with a bundled or given config")
    p.add_argument("--epochs", metavar="N[,N...]", help="training epochs; a comma list sweeps them")
    p.add_argument("--max-steps", type=int, metavar="N", help="train exactly N optimizer steps (HF max_steps; replaces epochs)")
    p.add_argument("--lr", metavar="X[,X...]", help="learning rate; a comma list sweeps it: 1e-5,2e-5,5e-5")
    p.add_argument("--sweep", metavar="FILE.yaml", help="sweep file: lr / epochs / METHOD.FIELD -> list of values")
    _batch_args(p)
    p.add_argument("--per-device-batch", type=int)
    _eval_batch_arg(p)
    p.add_argument("--optimizer", help="paged_adamw_32bit (default from the task), adamw_8bit, paged_adamw_8bit, "
                                       "adamw_32bit (bitsandbytes on CUDA; torch AdamW on CPU), adamw_torch")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-model", action="store_true", help="save the unlearned model as a HF checkpoint in the run directory")
    p.add_argument("--no-cache-reference", action="store_true", help="recompute reference log-probs every step instead of caching them")
    p.add_argument("--dry-run", action="store_true", help="print the expanded grid with resolved configs and exit")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose results exist")
    p.add_argument("--shard", metavar="i/n", help="run only cells i, i+n, ... of the grid (0-based)")
    p.add_argument("--cell", action="append", metavar="MODEL/TASK/METHOD/HASH-sSEED",
                   help="run only this cell of the grid (repeatable; what a --launcher job runs)")
    p.add_argument("--launcher", metavar="|".join(LAUNCHERS),
                   help="submit the cells as a submitit job array: slurm, or local (same path on this machine)")
    p.add_argument("--slurm-partition", metavar="NAME")
    p.add_argument("--slurm-gpus-per-node", type=int, metavar="N")
    p.add_argument("--slurm-time", metavar="TIME", help=f"time limit per cell, Slurm syntax (default {SLURM_TIME})")
    p.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="at most N cells running at once")
    p.add_argument("--slurm-setup", action="append", metavar="LINE",
                   help="shell line run before each job, e.g. 'source venv/bin/activate' (repeatable)")
    p.add_argument("--slurm-mem", metavar="SIZE", help="memory per node, Slurm syntax, e.g. 64G")
    p.add_argument("--slurm-cpus-per-task", type=int, metavar="N")
    _peft_args(p)
    _tracking_args(p)
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload the saved model, its model card and results to the Hugging Face hub in one commit "
                        "(implies --save-model; {task} {method} {seed} name one repository per cell)")
    p.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    p.add_argument("--eval-every", metavar="N|F", help="score during training every N optimizer steps, or every "
                                                         "fraction F of an epoch (0.25); rows in train_log.jsonl")
    p.add_argument("--eval-metrics", metavar="A,B", help="metrics scored by --eval-every (default: the task's eval_metrics)")
    p.add_argument("--keep-best", metavar="[min:|max:]METRIC",
                   help="keep the weights of the best --eval-every step by METRIC (its declared direction "
                        "unless min:/max:); that model is scored and saved")
    _model_args(p)
    _common(p)

    p = sub.add_parser("eval", help="score a checkpoint on tasks")
    p.add_argument("-t", "--tasks", required=True)
    p.add_argument("-o", "--output")
    p.add_argument("--name", help="row name in results and reports (e.g. finetuned, retain)")
    p.add_argument("--retain-model", action="store_true",
                   help="score the profile's retain (reference) model of each task instead of its start model (the Retain row)")
    _eval_batch_arg(p, alias=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--accelerate", metavar="single|ddp|zero3|FILE",
                   help="re-launch under accelerate (or torchrun): every process scores a shard of each data source")
    _model_args(p)
    _common(p)

    p = sub.add_parser("finetune", help="finetune a base model on a TOFU split (builds target / retain models)")
    p.add_argument("--model", required=True, help="base model: hub id, directory or profile")
    p.add_argument("--split", help="TOFU split to train on: full, retain99, retain95, retain90")
    p.add_argument("--task", help="task whose finetune: recipe applies (default: the one offering --split)")
    p.add_argument("-o", "--output", required=True, help="directory for the finetuned checkpoint")
    p.add_argument("--template")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    _batch_args(p)
    p.add_argument("--per-device-batch", type=int)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer")
    p.add_argument("--seed", type=int)
    p.add_argument("--accelerate")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--data-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint that --output already holds")
    _peft_args(p)
    _tracking_args(p)
    _common(p)

    p = sub.add_parser("report", help="tables in the published layout, comparison and plots")
    p.add_argument("results", nargs="?")
    p.add_argument("--format", choices=["md", "csv", "html", "json"])
    p.add_argument("--compare", nargs="?", const="published", metavar="CSV",
                   help="compare with the published numbers (shipped) or a CSV in the same layout")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--plot-x", metavar="METRIC", help="x axis of --plot instead of the family's, e.g. mmlu/acc (utility)")
    p.add_argument("--plot-y", metavar="METRIC", help="y axis of --plot instead of the family's (an fnmatch pattern also works)")
    p.add_argument("--output", "-o", metavar="FILE")
    p.add_argument("--model", help="only this model's results")
    p.add_argument("--timing", action="store_true",
                   help="also print the wall time of each run (training + scoring seconds, from scores.json)")
    p.add_argument("--best", metavar="METRIC",
                   help="sweeps: pick each method's best point by METRIC (default: forget_quality / forget_verbmem_ROUGE)")
    p.add_argument("--utility-fraction", type=float, metavar="F",
                   help=f"sweeps: only points keeping >= F x the Finetuned row's utility (default {UTILITY_FRACTION})")
    p.add_argument("--export", metavar="FILE.csv|FILE.json", help="sweeps: write the best-point table to FILE")
    p.add_argument("--curves", nargs="?", const="", metavar="FILE.png",
                   help="plot train loss and the --eval-every metrics over steps per run (default <results>/curves.png)")
    _common(p)

    p = sub.add_parser("status", help="cells of a results folder: done / running / failed / missing")
    p.add_argument("results", nargs="?")
    _common(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.verb:
        ap.print_help()
        return 2
    try:
        opts = to_options(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if opts.verbose else "%(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "DeepSpeed", "deepspeed", "httpx", "urllib3", "filelock",
                  "torchao", "torch.utils._pytree", "bitsandbytes"):  # peft imports torchao if installed
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not _has_cuda_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator probe
    try:
        if args.verb in ("run", "eval", "finetune"):
            # Probe once, before transformers/datasets read HF_HUB_OFFLINE at import: a failed probe
            # switches them to offline mode instead of ~50 s of retries per hub name.
            from harness.hub import hub_available

            hub_available()
        from importlib import import_module

        module = {"validate": "ls"}.get(args.verb, args.verb)
        rc = import_module(f"harness.commands.{module}").main(opts) or 0
        sys.stdout.flush()  # a closed pipe (`harness ls | head -1`) surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _closed_pipe()
    except HarnessError as exc:
        if opts.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if opts.debug:
            raise
        from harness.io import os_error_message

        if exc.errno in OS_USER_ERRORS:  # the disk or a path the user named, not a harness bug
            print(f"error: {os_error_message(exc, action='')}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # an unforeseen failure still gets one line; --debug shows where
        if opts.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


# errno values that mean "this path / this disk", reported as the user's problem (exit 2)
OS_USER_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _closed_pipe() -> int:
    """The reader of stdout went away: stop quietly. Pointing stdout at /dev/null keeps Python's final
    flush from printing "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (redirected in-process)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _has_cuda_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


if __name__ == "__main__":
    sys.exit(main())
