"""Command line: argparse turns argv into the verb's typed options (``harness.options``) once; each verb's
work lives in ``harness.commands.<verb>``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from harness import HarnessError, __version__
from harness.options import (
    ATTENTION_MASKS,
    EVAL_BATCH_SIZE,
    EvalOptions,
    FinetuneOptions,
    ListOptions,
    ReportOptions,
    RunOptions,
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-tasks", action="append", default=[], metavar="DIR", help="extra task YAML directory (repeatable)")
    p.add_argument("--plugins-dir", action="append", default=[], metavar="DIR", help="load loose plugin .py files from DIR (repeatable)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model profile name (harness ls models), hub id or local directory")
    p.add_argument("--template", default=None, metavar="FILE", help="YAML with open-unlearning template_args (for hub ids / directories)")
    p.add_argument("--reference", default=None, metavar="DIR|LOG",
                   help="retain model dir/id or *_EVAL.json / *_SUMMARY.json log; with several tasks it must contain {task} or {split}")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="local copies of dataset splits as <name>/<split>.jsonl")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint (off by default)")
    p.add_argument("--max-length", type=int, default=None, help="override the task's max sequence length")
    p.add_argument("--attention-mask", choices=list(ATTENTION_MASKS), default="reference",
                   help="reference: attention_mask = ids != pad as the published numbers (pad = eos hides eos tokens); corrected: mask padding only")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N rows of each split (smoke tests; marks results partial)")


class _Deprecated(argparse.Action):
    """``--batch-size``: the old name of the flag ``dest`` now has; says so once and sets it."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"notice: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _batch_args(p: argparse.ArgumentParser, *, train_default: int | None) -> None:
    p.add_argument("--train-batch-size", type=int, default=train_default,
                   help="effective (global) training batch size")
    p.add_argument("--batch-size", dest="train_batch_size", type=int, action=_Deprecated, help=argparse.SUPPRESS)


def _eval_batch_arg(p: argparse.ArgumentParser, *, alias: bool = False) -> None:
    p.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help="scoring batch size")
    if alias:
        p.add_argument("--batch-size", dest="eval_batch_size", type=int, action=_Deprecated, help=argparse.SUPPRESS)


OPTIONS = {"run": RunOptions, "eval": EvalOptions, "finetune": FinetuneOptions, "ls": ListOptions,
           "validate": ListOptions, "report": ReportOptions}


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

    p = sub.add_parser("ls", help="list tasks, methods, metrics, models, plugins")
    p.add_argument("what", nargs="?", default="all", choices=["all", "tasks", "methods", "metrics", "models", "plugins"])
    p.add_argument("pattern", nargs="?", default="*")
    _common(p)

    p = sub.add_parser("validate", help="load every plugin and task strictly and report problems")
    p.add_argument("-t", "--tasks", default="*")
    _common(p)

    p = sub.add_parser("run", help="unlearn and score: task x method x seed")
    p.add_argument("-t", "--tasks", required=True, help="names, fnmatch patterns or tags, comma separated")
    p.add_argument("-m", "--methods", required=True, help="method names, comma separated")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE", help="method hyper-parameter override (repeatable)")
    p.add_argument("--seeds", default="0", help="comma separated seeds")
    p.add_argument("-o", "--output", default="results")
    p.add_argument("--accelerate", default=None, metavar="single|ddp|zero3|FILE", help="re-launch under accelerate with a bundled or given config")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    _batch_args(p, train_default=None)
    p.add_argument("--per-device-batch", type=int, default=None)
    _eval_batch_arg(p)
    p.add_argument("--optimizer", default=None, help="e.g. paged_adamw_32bit (default from the task), adamw_torch")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-model", action="store_true", help="save the unlearned model as a HF checkpoint in the run directory")
    p.add_argument("--no-cache-reference", action="store_true", help="recompute reference log-probs every step instead of caching them")
    p.add_argument("--dry-run", action="store_true", help="print the expanded grid with resolved configs and exit")
    p.add_argument("--overwrite", action="store_true", help="redo runs whose results exist")
    p.add_argument("--shard", default=None, metavar="i/n", help="run only cells i, i+n, ... of the grid (0-based)")
    _model_args(p)
    _common(p)

    p = sub.add_parser("eval", help="score a checkpoint on tasks")
    p.add_argument("-t", "--tasks", required=True)
    p.add_argument("-o", "--output", default="results")
    p.add_argument("--name", default="eval", help="row name in results and reports (e.g. finetuned, retain)")
    p.add_argument("--retain-model", action="store_true",
                   help="score the profile's retain (reference) model of each task instead of its start model (the Retain row)")
    _eval_batch_arg(p, alias=True)
    p.add_argument("--overwrite", action="store_true")
    _model_args(p)
    _common(p)

    p = sub.add_parser("finetune", help="finetune a base model on a TOFU split (builds target / retain models)")
    p.add_argument("--model", required=True, help="base model: hub id, directory or profile")
    p.add_argument("--split", default="full", help="TOFU split to train on: full, retain99, retain95, retain90")
    p.add_argument("-o", "--output", required=True, help="directory for the finetuned checkpoint")
    p.add_argument("--template", default=None)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--lr", type=float, default=1e-5)
    _batch_args(p, train_default=32)
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--optimizer", default="paged_adamw_32bit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerate", default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint that --output already holds")
    _common(p)

    p = sub.add_parser("report", help="tables in the published layout, comparison and plots")
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--format", choices=["md", "csv", "html", "json"], default="md")
    p.add_argument("--compare", nargs="?", const="published", default=None, metavar="CSV",
                   help="compare with the published numbers (shipped) or a CSV in the same layout")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    p.add_argument("--output", "-o", default=None, metavar="FILE")
    p.add_argument("--model", default=None, help="only this model's results")
    p.add_argument("--timing", action="store_true",
                   help="also print the wall time of each run (training + scoring seconds, from scores.json)")
    _common(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.verb:
        ap.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(message)s" if not getattr(args, "verbose", False) else "%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "DeepSpeed", "deepspeed", "httpx", "urllib3", "filelock"):
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
        return import_module(f"harness.commands.{module}").main(to_options(args)) or 0
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an unforeseen failure still gets one line; --debug shows where
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def _has_cuda_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


if __name__ == "__main__":
    sys.exit(main())
