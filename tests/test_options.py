"""argv becomes the verb's typed options once; defaults live only in the dataclasses; flags named by meaning."""

import argparse
import dataclasses

import pytest

from harness import HarnessError
from harness.cli import OPTIONS, build_parser, parse_options, to_options
from harness.options import EVAL_BATCH_SIZE, EvalOptions, FinetuneOptions, RunOptions


def _subparsers():
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("verb", sorted(OPTIONS))
def test_every_flag_has_a_typed_field_and_no_parser_default(verb):
    fields = {f.name for f in dataclasses.fields(OPTIONS[verb])}
    for action in _subparsers()[verb]._actions:
        if action.dest == "help":
            continue
        assert action.dest in fields, f"harness {verb} {action.option_strings}: no field in {OPTIONS[verb].__name__}"
        assert action.default is argparse.SUPPRESS, f"harness {verb} {action.option_strings} keeps its own default"


def test_defaults_come_from_the_dataclasses():
    assert parse_options(["run", "-t", "a", "-m", "b"]) == RunOptions(tasks="a", methods="b")
    assert parse_options(["eval", "-t", "a"]) == EvalOptions(tasks="a")
    assert parse_options(["eval", "-t", "a"]).eval_batch_size == EVAL_BATCH_SIZE
    assert parse_options(["finetune", "--model", "m", "-o", "o"]) == FinetuneOptions(model="m", output="o")


def test_batch_flags_named_by_meaning_and_the_old_name_is_a_noticed_alias(capsys):
    run = parse_options(["run", "-t", "a", "-m", "b", "--train-batch-size", "16", "--eval-batch-size", "4"])
    assert (run.train_batch_size, run.eval_batch_size) == (16, 4)
    assert capsys.readouterr().err == ""
    assert parse_options(["run", "-t", "a", "-m", "b", "--batch-size", "8"]).train_batch_size == 8
    assert "--batch-size is deprecated; use --train-batch-size" in capsys.readouterr().err
    assert parse_options(["eval", "-t", "a", "--batch-size", "8"]).eval_batch_size == 8
    assert "use --eval-batch-size" in capsys.readouterr().err
    assert parse_options(["finetune", "--model", "m", "-o", "o", "--batch-size", "8"]).train_batch_size == 8


def test_a_flag_without_a_field_is_refused():
    args = build_parser().parse_args(["eval", "-t", "a"])
    args.no_such_flag = 1
    with pytest.raises(HarnessError, match="no_such_flag"):
        to_options(args)


def test_baseline_eval_keeps_the_run_scoring_options(tmp_path):
    d = str(tmp_path)
    run = parse_options(["run", "-t", "a", "-m", "b", "--limit", "3", "--eval-batch-size", "5",
                         "--attention-mask", "corrected", "--data-dir", d, "-o", "out"])
    base = run.baseline("a")
    assert (base.tasks, base.name, base.limit, base.eval_batch_size, base.attention_mask, base.data_dir,
            base.output) == ("a", "finetuned", 3, 5, "corrected", d, "out")
