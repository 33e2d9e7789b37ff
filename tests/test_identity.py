"""A run's identity covers everything that changes its numbers (data, checkpoint bytes, metric versions), and
nothing finished is lost: --overwrite keeps the old result until the new one is scored."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, cheap_task_yaml, run_cli

from harness import plugins
from harness.results.rundir import ASIDE, claim, is_complete, recover
from harness.results.tables import console_value

TASK = cheap_task_yaml("t7_id", "forget01 with one cheap metric, for the identity tests")
TRAIN = ["--limit", "2", "--epochs", "1", "--train-batch-size", "2", "--per-device-batch", "2"]
PLUGIN_METRIC = '''
from harness import hookimpl
from harness.metrics import Score, metric

METRICS = []


@metric("t7_prob_plus", version=@VERSION@, into=METRICS)
def t7_prob_plus(ctx):
    """forget_Q_A_Prob, through the plugin (its version is part of every run that computes it)."""
    return Score(ctx.score("forget_Q_A_Prob").value + @VERSION@)


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
'''


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


@pytest.fixture
def env(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t7_id.yaml").write_text(TASK)
    return tmp_path


def data_dir(env, name: str, reverse: bool = False):
    """A --data-dir with the task's forget splits (trained on, scored on): the bundled rows, or the same
    rows in reverse order (so with --limit 2 other questions are trained on and scored)."""
    d = env / name
    d.mkdir()
    for split in ("forget01", "forget01_perturbed"):
        rows = (ROOT / "harness" / "bundled" / "tofu" / f"{split}.jsonl").read_text().splitlines()
        (d / f"{split}.jsonl").write_text("\n".join(rows[::-1] if reverse else rows) + "\n")
    return d


def evaluate(env, *extra):
    _, out, _ = run_cli("eval", "-t", "t7_id", "--include-tasks", env / "tasks", "--limit", "2",
                        "-o", env / "res", *extra)
    return out


def runs(env, model, method):
    return sorted((env / "res" / model / "t7_id" / method).glob("*-s0"))


def value(d, metric="forget_Q_A_Prob"):
    return json.loads((d / "scores.json").read_text())["metrics"][metric]["value"]


# ------------------------------------------------------------------------------------------ identity
def test_eval_on_other_data_is_a_new_run(env):
    a, b = data_dir(env, "a"), data_dir(env, "b", reverse=True)
    evaluate(env, "--model", "tiny:full", "--data-dir", a)
    out = evaluate(env, "--model", "tiny:full", "--data-dir", b)
    assert "results exist" not in out
    (d1, d2) = runs(env, "tiny_full", "eval")
    assert value(d1) != value(d2)
    # the same data rewritten in place at the same path is other data too
    shutil.copy(a / "forget01_perturbed.jsonl", b / "forget01_perturbed.jsonl")
    out = evaluate(env, "--model", "tiny:full", "--data-dir", b)
    assert "results exist" not in out
    assert len(runs(env, "tiny_full", "eval")) == 3
    fp = yaml.safe_load((d1 / "config.yaml").read_text())["fingerprints"]
    assert fp["data"]["forget"].startswith("sha256:") and fp["scoring_version"] == 1
    assert fp["metrics"] == {"forget_Q_A_Prob": 1}


def test_no_shared_prefix_is_a_cell_of_its_own(env):
    """--no-shared-prefix rounds option sets differently: `eval` and `run` give it its own folder, and the
    default keeps the hash it had before the flag entered the identity."""
    evaluate(env, "--model", "tiny:full")
    assert "results exist" in evaluate(env, "--model", "tiny:full")
    assert "results exist" not in evaluate(env, "--model", "tiny:full", "--no-shared-prefix")
    (d1, d2) = runs(env, "tiny_full", "eval")
    evals = sorted(yaml.safe_load((d / "config.yaml").read_text())["eval"].get("shared_prefix", True) for d in (d1, d2))
    assert evals == [False, True]
    from harness.commands.run import expand
    from harness.options import RunOptions

    reg = plugins.build_registry(include_tasks=[str(env / "tasks")], strict=True)
    names = {}
    for on in (True, False):
        opts = RunOptions(tasks="t7_id", methods="npo", model="tiny:full", include_tasks=[str(env / "tasks")],
                          shared_prefix=on)
        (cell,) = expand(opts, reg)
        names[on] = cell.dir.name
        assert ("shared_prefix" in cell.config["eval"]) is not on
    assert names[True] != names[False]


def test_checkpoint_rewritten_in_place_is_a_new_run(env, tiny_full_dir, tiny_retain99_dir):
    ckpt = env / "ckpt"
    shutil.copytree(tiny_full_dir, ckpt)
    evaluate(env, "--model", ckpt)
    again = evaluate(env, "--model", ckpt)
    assert "results exist" in again  # same bytes: the finished result is reused
    shutil.copy(tiny_retain99_dir / "model.safetensors", ckpt / "model.safetensors")
    out = evaluate(env, "--model", ckpt)
    assert "results exist" not in out
    (d1, d2) = sorted(runs(env, "ckpt", "eval"), key=lambda d: d.stat().st_mtime_ns)
    assert value(d1) != value(d2)
    assert yaml.safe_load((d1 / "config.yaml").read_text())["fingerprints"]["start"].startswith("sha256:")


def test_bumped_metric_version_is_a_new_run_cell(env, monkeypatch):
    """A plugin metric's version, and that of a metric it computes on the way, are part of a run cell's hash."""
    plugs = env / "plugs"
    plugs.mkdir()
    (plugs / "t7metric.py").write_text(PLUGIN_METRIC.replace("@VERSION@", "1"))
    (env / "tasks" / "t7_id.yaml").write_text(TASK.replace("[forget_Q_A_Prob]", "[t7_prob_plus]"))
    argv = ["run", "-t", "t7_id", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", env / "tasks",
            "--plugins-dir", plugs, "-o", env / "res", *TRAIN]
    run_cli(*argv)
    (first,) = runs(env, "tiny_full", "grad_ascent")
    assert value(first, "t7_prob_plus") > 1

    # the plugin's next release (another file name: this process keeps the imported module of the first)
    (plugs / "t7metric.py").unlink()
    (plugs / "t7metric_2.py").write_text(PLUGIN_METRIC.replace("@VERSION@", "2"))
    plugins._CACHE.clear()
    run_cli(*argv)
    cells = runs(env, "tiny_full", "grad_ascent")
    assert len(cells) == 2
    (second,) = [d for d in cells if d != first]
    assert value(second, "t7_prob_plus") > 2  # a fresh number of the new definition
    assert yaml.safe_load((second / "config.yaml").read_text())["fingerprints"]["metrics"] == \
        {"forget_Q_A_Prob": 1, "t7_prob_plus": 2}

    # the dependency's version counts as well
    reg = plugins.get_registry(plugins_dirs=[str(plugs)], include_tasks=[str(env / "tasks")])
    dep = reg.metrics["forget_Q_A_Prob"]
    monkeypatch.setitem(reg.metrics, "forget_Q_A_Prob", dataclasses.replace(dep, version=7))
    run_cli(*argv)
    assert len(runs(env, "tiny_full", "grad_ascent")) == 3


def test_run_baseline_on_other_data_is_rescored(env):
    """The "finetuned (start)" row of `harness run` is an eval of the start model: other --data-dir, new row."""
    a, b = data_dir(env, "a"), data_dir(env, "b", reverse=True)
    common = ["run", "-t", "t7_id", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", env / "tasks",
              "-o", env / "res", *TRAIN]
    run_cli(*common, "--data-dir", a)
    _, out, _ = run_cli(*common, "--data-dir", b)
    (d1, d2) = sorted(runs(env, "tiny_full", "finetuned"), key=lambda d: d.stat().st_mtime_ns)
    assert value(d1) != value(d2)
    (row,) = [ln for ln in out.splitlines() if "finetuned (start)" in ln]
    assert re.search(rf"\| {re.escape(console_value(value(d2)))} +\|", row), row


def test_dry_run_builds_no_tiny_model_and_names_the_directory_a_run_uses(env, monkeypatch):
    home = env / "home"
    monkeypatch.setenv("HARNESS_HOME", str(home))
    argv = ["run", "-t", "t7_id", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", env / "tasks",
            "-o", env / "res", *TRAIN]
    _, out, _ = run_cli(*argv, "--dry-run")
    assert not list(home.rglob("config.json"))  # no model was built
    planned = out.split("-> ", 1)[1].split()[0]
    monkeypatch.delenv("HARNESS_HOME")  # the shared test home, where the tiny models are built already
    _, out, _ = run_cli(*argv, "--dry-run")
    assert out.split("-> ", 1)[1].split()[0] == planned


# ------------------------------------------------------------------------------ nothing finished is lost
def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("verb", ["run", "eval"])
def test_interrupted_overwrite_keeps_the_finished_result(env, monkeypatch, verb):
    argv = [verb, "-t", "t7_id", "--model", "tiny:full", "--include-tasks", env / "tasks", "-o", env / "res",
            *(["-m", "grad_ascent", *TRAIN] if verb == "run" else ["--limit", "2"])]
    method = "grad_ascent" if verb == "run" else "eval"
    run_cli(*argv)
    (cell,) = runs(env, "tiny_full", method)
    before = _snapshot(cell)

    def interrupted(*args, **kwargs):
        # what a Ctrl-C in the middle leaves: a partial training log / a half-written result file
        (cell / ("train_log.jsonl" if verb == "run" else "TOFU_EVAL.json")).write_text('{"step": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr("harness.training.unlearn" if verb == "run" else "harness.commands.eval.score_model",
                        interrupted)
    rc, _, err = run_cli(*argv, "--overwrite", check=False)
    assert rc == 130, err
    assert _snapshot(cell) == before
    assert not (cell / ASIDE).exists()
    monkeypatch.undo()
    monkeypatch.setattr(plugins, "_CACHE", {})
    run_cli(*argv, "--overwrite")  # a finished overwrite replaces it and drops the old copy
    assert is_complete(cell) and not (cell / ASIDE).exists()
    assert runs(env, "tiny_full", method) == [cell]


KILLED_DURING = """
import os, sys
from pathlib import Path
from harness.results.rundir import replacing

d = Path(sys.argv[1])
cm = replacing(d, True)
cm.__enter__()
for name, text in zip(sys.argv[2::2], sys.argv[3::2]):
    (d / name).write_text(text)
os._exit(9)  # like SIGKILL: no finally, no cleanup
"""


def _killed_during_overwrite(d, *files):
    r = subprocess.run([sys.executable, "-c", KILLED_DURING, str(d), *files], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 9, r.stderr


def test_overwrite_killed_midway_is_recovered_by_the_next_claim(tmp_path):
    d = tmp_path / "cell"
    d.mkdir()
    (d / "scores.json").write_text('{"metrics": {}}')
    (d / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    before = _snapshot(d)
    _killed_during_overwrite(d, "train_log.jsonl", '{"step": 1}\n')
    assert not is_complete(d) and (d / ASIDE).is_dir()  # never finished with mixed files
    with claim(d) as mine:
        assert mine
        assert _snapshot(d) == before and not (d / ASIDE).exists()
    # killed after the new scores.json was written: the new result stays, the old copy goes
    _killed_during_overwrite(d, "scores.json", '{"metrics": {"new": 1}}')
    recover(d)
    assert json.loads((d / "scores.json").read_text()) == {"metrics": {"new": 1}}
    assert not (d / ASIDE).exists() and not (d / "model").exists()


def test_finetune_onto_a_checkpoint_needs_overwrite(env, tiny_full_dir):
    out = env / "ckpt"
    shutil.copytree(tiny_full_dir, out)
    before = _snapshot(out)
    argv = ["finetune", "--model", "tiny:base", "--split", "forget01", "-o", out, "--epochs", "1",
            "--train-batch-size", "8", "--per-device-batch", "8", "--optimizer", "adamw_torch"]
    rc, _, err = run_cli(*argv, check=False)
    assert rc == 2 and err.count("error:") == 1
    assert f"--output {out} already holds a checkpoint; pass --overwrite" in err
    assert _snapshot(out) == before
    run_cli(*argv, "--overwrite")
    assert (out / "finetune.yaml").is_file() and not (out / ASIDE).exists()
    assert (out / "model.safetensors").read_bytes() != before[out.relative_to(out) / "model.safetensors"]
    assert (out / "train_log.jsonl").is_file()


def test_save_model_on_a_finished_cell_says_it_saved_nothing(env, caplog):
    argv = ["run", "-t", "t7_id", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", env / "tasks",
            "-o", env / "res", *TRAIN]
    run_cli(*argv)
    with caplog.at_level("WARNING", logger="harness"):
        run_cli(*argv, "--save-model")
    (cell,) = runs(env, "tiny_full", "grad_ascent")
    assert not (cell / "model").exists()
    assert "finished earlier without a saved model, so none was saved; pass --overwrite" in caplog.text
