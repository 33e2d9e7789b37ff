"""The reproduction scripts' grids: dry-runs (no harness call, no network, no GPU), shards, tiny mode."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from harness.cli import build_parser, to_options
from harness.options import RunOptions

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT / "scripts" / "tofu_unlearn.sh"
MUSE = ROOT / "scripts" / "muse_unlearn.sh"
PARSER = build_parser()
EVAL_FLAGS = PARSER._subparsers._group_actions[0].choices["eval"]._option_string_actions


def script(
    path: Path, *args: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in {"HARNESS_MODEL", "HARNESS"}}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(path), *args], capture_output=True, text=True, env=full_env, timeout=60, check=check
    )


def grid(path: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    out = script(path, "--dry-run", *args, env=env).stdout
    lines = [shlex.split(line) for line in out.splitlines()]
    assert all(words[0] == "harness" for words in lines)
    return [words[1:] for words in lines]


def parse(words: list[str]):
    """Each printed command must parse with the real CLI, so the scripts cannot drift from it."""
    if words[0] == "eval" and "--retain-model" in words and "--retain-model" not in EVAL_FLAGS:
        # Flag requested from the CLI owner (score the profile's retain model for the task's split).
        words = [w for w in words if w != "--retain-model"]
    return to_options(PARSER.parse_args(words))


def test_tofu_published_grid():
    cells = grid(TOFU)
    runs = [parse(w) for w in cells if w[0] == "run"]
    evals = [(parse(w), "--retain-model" in w) for w in cells if w[0] == "eval"]
    assert len(runs) == 30
    assert len(evals) == 12  # Finetuned + Retain x 3 splits x 2 models
    assert Counter((a.model, a.tasks, a.methods) for a in runs) == Counter(
        (model, f"tofu_{split}", method)
        for model in ["llama2-7b-chat", "llama3.2-1b-instruct"]
        for split in ["forget01", "forget05", "forget10"]
        for method in ["grad_ascent", "grad_diff", "idk_dpo", "npo", "simnpo"]
    )
    for a in runs:  # the published hyper-parameters
        assert (float(a.lr), float(a.epochs), a.train_batch_size, a.per_device_batch) == (1e-5, 10, 32, 4)
        assert (a.accelerate, a.optimizer, a.gradient_checkpointing) == ("zero3", "paged_adamw_32bit", True)
        assert (a.seeds, a.output, a.set) == ("0", "results", [])
    assert Counter((a.model, a.tasks, a.name, retain) for a, retain in evals) == Counter(
        (model, f"tofu_{split}", name, name == "retain")
        for model in ["llama2-7b-chat", "llama3.2-1b-instruct"]
        for split in ["forget01", "forget05", "forget10"]
        for name in ["finetuned", "retain"]
    )


def test_muse_published_grid():
    cells = grid(MUSE)
    runs = [parse(w) for w in cells if w[0] == "run"]
    evals = [parse(w) for w in cells if w[0] == "eval"]
    assert len(runs) == 8 and len(evals) == 4
    assert {(a.model, a.tasks, a.methods) for a in runs} == {
        ("llama2-7b", f"muse_{s}", m)
        for s in ["news", "books"]
        for m in ["grad_ascent", "grad_diff", "npo", "simnpo"]
    }
    for a in runs:
        assert (float(a.lr), float(a.epochs), a.train_batch_size, a.per_device_batch) == (1e-5, 10, 64, 4)
        assert (a.accelerate, a.optimizer) == ("zero3", "paged_adamw_32bit")
    assert {(a.tasks, a.name) for a in evals} == {
        (f"muse_{s}", n) for s in ["news", "books"] for n in ["finetuned", "retain"]
    }


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tiny_grids(how):
    args, env = (["--model", "tiny"], None) if how == "flag" else ([], {"HARNESS_MODEL": "tiny"})
    tofu = [parse(w) for w in grid(TOFU, *args, env=env)]
    assert len(tofu) == 15 + 6
    assert {a.model for a in tofu} == {"tiny"}
    for a in tofu:
        if isinstance(a, RunOptions):  # the tiny profile's own training defaults and a single process
            assert (a.lr, a.epochs, a.train_batch_size, a.accelerate, a.optimizer) == (None, None, None, None, None)

    muse = script(MUSE, "--dry-run", *args, env=env)
    cells = [parse(shlex.split(line)[1:]) for line in muse.stdout.splitlines()]
    assert len(cells) == 4 + 2
    assert {a.tasks for a in cells} == {"muse_news"}
    assert "muse_books skipped" in muse.stderr and "not bundled" in muse.stderr


@pytest.mark.parametrize("path, n", [(TOFU, 3), (TOFU, 4), (MUSE, 5), (MUSE, 12)])
def test_shards_partition_the_grid_round_robin(path, n):
    full = grid(path)
    shards = [grid(path, "--shard", f"{i}/{n}") for i in range(n)]
    assert sum(len(s) for s in shards) == len(full)
    for i, shard in enumerate(shards):
        assert shard == full[i::n]


def test_seeds_output_limit_and_extra_args_pass_through():
    cells = grid(TOFU, "--model", "tiny", "--seeds", "0,1,2", "-o", "out dir", "--limit", "8", "--",
                 "--set", "npo.beta=0.2")  # fmt: skip
    runs = [parse(w) for w in cells if w[0] == "run"]
    evals = [parse(w) for w in cells if w[0] == "eval"]
    assert {a.seeds for a in runs} == {"0,1,2"}
    assert {a.output for a in runs + evals} == {"out dir"}
    assert {a.limit for a in runs + evals} == {8}
    assert all(a.set == ["npo.beta=0.2"] for a in runs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "4/4"], "--shard '4/4' must be i/n"),
        (["--shard", "x"], "must be i/n"),
        (["--bogus"], "unknown option '--bogus'"),
    ],
)
def test_bad_arguments(args, message):
    res = script(TOFU, "--dry-run", *args, check=False)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_execution_calls_harness_per_cell_and_reports_failures(tmp_path):
    """Not a dry run: each cell of the shard is one harness call with its exact words; failures are
    collected, the other cells still run, and the exit status says so."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake harness"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(3 if 'npo' in sys.argv else 0)\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    res = script(MUSE, "--model", "tiny", "-o", str(tmp_path / "it's here"), "--shard", "0/2",
                 env={"HARNESS": shlex.quote(str(fake))}, check=False)  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    expected = grid(MUSE, "--model", "tiny", "-o", str(tmp_path / "it's here"), "--shard", "0/2")
    assert calls == expected and len(calls) == 3
    assert res.returncode == 1
    assert "1 cell(s) failed" in res.stderr and "-m npo" in res.stderr


NEW_METHODS = ["rmu", "undial", "wga", "satimp", "ce_u", "pdu", "altpo"]


@pytest.mark.parametrize("path, published", [(TOFU, 10), (MUSE, 10)])
def test_methods_option_accepts_the_new_methods(path, published):
    """--methods takes every new method; they get the published batch / optimizer / accelerate, but their
    epochs and learning rate come from the task's per-method defaults, not the published grid's flags."""
    runs = [parse(w) for w in grid(path, "--methods", ",".join(NEW_METHODS + ["npo"])) if w[0] == "run"]
    assert [a.methods for a in runs[:8]] == NEW_METHODS + ["npo"]
    for a in runs:
        assert a.accelerate == "zero3" and a.optimizer == "paged_adamw_32bit" and a.per_device_batch == 4
        if a.methods == "npo":
            assert (float(a.lr), float(a.epochs)) == (1e-5, published)  # flags stay text (sweep lists)
        else:
            assert (a.lr, a.epochs) == (None, None)
    default = {parse(w).methods for w in grid(path) if w[0] == "run"}
    assert not default & set(NEW_METHODS)  # the published grid stays as published


def test_methods_option_rejects_unknown_names():
    res = script(TOFU, "--dry-run", "--methods", "wga,nosuch", check=False)
    assert res.returncode == 2 and "unknown method 'nosuch'" in res.stderr and res.stdout == ""
