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


def _eval(tmp_path, name, *extra, env_extra=None):
    env = {**os.environ, "HARNESS_HOME": str(_home(tmp_path, name)), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    out = tmp_path / f"out_{name}"
    cmd = [sys.executable, "-m", "harness", "eval", "-t", "t17_dp", "--include-tasks", tmp_path / "tasks",
           "--model", "tiny:full", "--reference", "tiny:retain99", "--limit", "7", "--eval-batch-size", "2",
           "-o", out, *extra]
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(out.glob("*/t17_dp/eval/*"))
    assert len(runs) == 1, runs
    return runs[0], proc.stdout, Path(env["HARNESS_HOME"])


@pytest.mark.slow
def test_two_process_eval_writes_the_files_of_one_process(tmp_path, tiny_full_dir, tiny_retain99_dir):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t17_dp.yaml").write_text(TASK)
    one, out1, home1 = _eval(tmp_path, "one")
    two, out2, home2 = _eval(tmp_path, "two", "--accelerate", "ddp", env_extra={"HARNESS_NUM_PROCESSES": "2"})
    assert one.name == two.name  # the world size is not part of the run's identity
    for f in FILES:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    s1, s2 = (json.loads((d / "scores.json").read_text()) for d in (one, two))
    assert s1["metrics"] == s2["metrics"]
    assert s2["metrics"]["forget_quality"]["value"] > 0 and s2["metrics"]["mia_gradnorm"]["value"] is not None
    # the retain model was scored in shards too; its cache was written once, the same as one process's
    caches = [list(h.glob("references/*/TOFU_EVAL.json")) for h in (home1, home2)]
    assert [len(c) for c in caches] == [1, 1] and caches[0][0].read_bytes() == caches[1][0].read_bytes()
    assert not list(home2.glob("references/*/.*tmp"))
    assert out2.count("results: ") == 1 and out2.count("forget_quality") == 1  # one table, from rank 0
    rows = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    gen = [r for r in rows if r["metric"] == "forget_Q_A_ROUGE"]
    assert [r["index"] for r in gen] == list(range(7)) and len({r["input"] for r in gen}) == 7
