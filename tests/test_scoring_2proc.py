"""Data-parallel scoring (scoring/shard.py): two CPU processes (gloo) each score a shard of every data
source, and the result files are those of one process, byte for byte: forward passes (single answers
and shared-prefix option sets), generation, GradNorm, the retain model's reference scores and cache,
and the metrics computed from the gathered values (KS test, ROUGE, AUCs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from harness.scoring.shard import deal

TASK = f"""\
task: t17_dp
include: {ROOT}/tasks/tofu/_base.yaml
description: forget01 scored with every kind of primitive
data:
  forget: {{path: locuslab/TOFU, name: forget01}}
  retain: {{path: locuslab/TOFU, name: retain99}}
  forget_eval: {{path: locuslab/TOFU, name: forget01_perturbed}}
  holdout: {{path: locuslab/TOFU, name: holdout01}}
metrics: [forget_quality, forget_Q_A_ROUGE, privleak, mia_gradnorm, mia_reference, extraction_strength]
"""
FILES = ("TOFU_EVAL.json", "TOFU_SUMMARY.json", "samples.jsonl")


def _items(lengths):
    return [{"input_ids": [0] * n} for n in lengths]


def test_deal_gives_every_row_once_in_whole_batches_longest_first():
    items = _items([3, 9, 5, 9, 1, 7, 2])
    shards = deal(items, list(range(7)), 2, 2)
    # longest first (stable): rows 1 3 | 5 2 | 0 6 | 4; blocks alternate between the ranks
    assert shards == [[0, 1, 3, 6], [2, 4, 5]]
    # option sets (rows of 3 items): a batch of 7 items holds 2 sets
    items = _items([4, 4, 4, 8, 8, 8, 1, 1, 1, 6, 6, 6, 2, 2, 2])
    layout = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert deal(items, layout, 7, 2) == [[1, 2, 3], [0, 4]]
    assert deal(items, layout, 7, 3) == [[1, 3], [0, 4], [2]]
    assert deal(items, [], 4, 2) == [[], []]


def _home(base: Path, name: str) -> Path:
    """A HARNESS_HOME with the session's tiny models and its own (empty) reference cache."""
    home = base / name
    home.mkdir()
    (home / "tiny").symlink_to(Path(os.environ["HARNESS_HOME"]).resolve() / "tiny", target_is_directory=True)
    return home


def _eval(tmp_path, name, *extra, env_extra=None, model="tiny:full", method="eval"):
    env = {**os.environ, "HARNESS_HOME": str(_home(tmp_path, name)), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    out = tmp_path / f"out_{name}"
    cmd = [sys.executable, "-m", "harness", "eval", "-t", "t17_dp", "--include-tasks", tmp_path / "tasks",
           "--model", model, "--reference", "tiny:retain99", "--limit", "7", "--eval-batch-size", "2",
           "-o", out, *extra]
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(out.glob(f"*/t17_dp/{method}/*-s0"))
    assert len(runs) == 1, runs
    return runs[0], proc.stdout, Path(env["HARNESS_HOME"])




@pytest.mark.slow
def test_two_process_run_writes_the_files_of_one_process(tmp_path, tiny_full_dir, tiny_retain99_dir):
    """`harness run --accelerate ddp` with two processes: both ranks score the baseline (the start model,
    through `harness eval`'s code) and the unlearned model in shards; their files equal those of a
    one-process `harness eval` of the start model and of the saved model."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t17_dp.yaml").write_text(TASK)
    env = {**os.environ, "HARNESS_HOME": str(_home(tmp_path, "run")), "OMP_NUM_THREADS": "1",
           "HARNESS_NUM_PROCESSES": "2", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out_run"
    cmd = [sys.executable, "-m", "harness", "run", "-t", "t17_dp", "-m", "grad_diff", "--include-tasks",
           tmp_path / "tasks", "--model", "tiny:full", "--reference", "tiny:retain99", "--limit", "7",
           "--eval-batch-size", "2", "--train-batch-size", "2", "--per-device-batch", "1", "--epochs", "1",
           "--optimizer", "adamw_torch", "--lr", "1e-3", "--accelerate", "ddp", "--save-model", "-o", out]
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = next(out.glob("*/t17_dp/grad_diff/*"))
    assert json.loads((cell / "scores.json").read_text())["metrics"]["forget_quality"]["value"] > 0
    assert proc.stdout.count("grad_diff ") == 1  # one summary table, from rank 0
    base = next(out.glob("*/t17_dp/finetuned/*"))
    one, _, home1 = _eval(tmp_path, "one", "--name", "finetuned", method="finetuned")
    assert one.name == base.name  # the world size is not part of the run's identity
    template = Path(tiny_full_dir) / "harness_template.yaml"
    saved, _, _ = _eval(tmp_path, "saved", "--template", template, model=cell / "model")
    for a, b in ((one, base), (saved, cell)):
        for f in FILES:
            assert (a / f).read_bytes() == (b / f).read_bytes(), (b, f)
        assert json.loads((a / "scores.json").read_text())["metrics"] == json.loads((b / "scores.json").read_text())["metrics"]
    assert (base / "TOFU_EVAL.json").read_bytes() != (cell / "TOFU_EVAL.json").read_bytes()  # it did unlearn
    # the retain model was scored in shards too: its cache was written once, as one process writes it
    caches = [list(h.glob("references/*/TOFU_EVAL.json")) for h in (home1, Path(env["HARNESS_HOME"]))]
    assert [len(c) for c in caches] == [1, 1] and caches[0][0].read_bytes() == caches[1][0].read_bytes()
    rows = [json.loads(line) for line in (cell / "samples.jsonl").read_text().splitlines()]
    gen = [r for r in rows if r["metric"] == "forget_Q_A_ROUGE"]
    assert [r["index"] for r in gen] == list(range(7)) and len({r["input"] for r in gen}) == 7


def test_eval_accelerate_relaunches_with_its_own_options(monkeypatch):
    """`harness eval --accelerate ddp` re-launches itself with flags that parse back to the same options."""
    from harness.cli import parse_options
    from harness.commands import eval as eval_cmd
    from harness.training import distributed

    seen = []
    monkeypatch.setattr(distributed, "relaunch", lambda argv, mode: seen.append((argv, mode)) or 0)
    opts = parse_options(["eval", "-t", "tofu_forget01", "--limit", "3", "--accelerate", "ddp", "-o", "r d"])
    assert eval_cmd.main(opts) == 0
    (argv, mode), = seen
    assert mode == "ddp" and argv[0] == "eval" and parse_options(argv) == opts
