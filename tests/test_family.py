"""A benchmark family is data: a family defined only by YAML files trains, scores and gets its own report
table; the data a run reads is decided before its hash and recorded in config.yaml."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli

from harness import hub
from harness.io import read_yaml

# Unlearns raw news texts (corpus chunks) and scores TOFU QA metrics on bundled splits. The retain corpus
# is not bundled: with a tiny model its tiny_fallback (the bundled privleak retain texts) is read instead.
BASE = """\
tag: [minifam]
benchmark: MINI
prompt: {question: question, answer: answer, text: text}
data:
  forget: {path: muse-bench/MUSE-News, name: privleak, split: forget}
  retain: {path: muse-bench/MUSE-News, name: raw, split: retain1,
           tiny_fallback: {name: privleak, split: retain}}
  forget_eval: {path: locuslab/TOFU, name: forget01_perturbed}
training: {format: corpus, max_length: 256}
metrics: [forget_Q_A_Prob, forget_Q_A_ROUGE]
report:
  title: Mini family
  split_order: [second, first]
  columns: [forget_Q_A_ROUGE, forget_Q_A_Prob]
  plot: {x: forget_Q_A_ROUGE, y: forget_Q_A_Prob}
"""
TASKS = {"_base.yaml": BASE,
         "mini_a.yaml": "task: mini_a\ninclude: _base.yaml\nreport: {split: first}\n",
         "mini_b.yaml": "task: mini_b\ninclude: _base.yaml\nreport: {split: second}\n"}
TRAIN = ["--epochs", "1", "--lr", "1e-3", "--train-batch-size", "2", "--per-device-batch", "2", "--optimizer", "adamw_torch"]


def family_dir(tmp_path, files=TASKS):
    d = tmp_path / "family"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_yaml_only_family_trains_scores_and_gets_its_own_report_table(tmp_path):
    d, out = family_dir(tmp_path), tmp_path / "res"
    run_cli("run", "-t", "minifam", "-m", "grad_diff", "--model", "tiny:full", "--include-tasks", d, "-o", out,
            "--limit", "2", *TRAIN)
    runs = sorted(out.glob("tiny_full/mini_*/grad_diff/*-s0"))
    assert [r.parent.parent.name for r in runs] == ["mini_a", "mini_b"]
    run = runs[0]
    scores = json.loads((run / "scores.json").read_text())
    assert scores["benchmark"] == "MINI" and scores["report"]["split"] == "first"
    assert set(scores["metrics"]) == {"forget_Q_A_Prob", "forget_Q_A_ROUGE"}
    assert (run / "MINI_EVAL.json").is_file()  # the export is named by the family's benchmark
    config = read_yaml(run / "config.yaml")
    assert config["task"]["training_data"]["format"] == "corpus"
    sources = config["data_sources"]
    assert sources["forget"]["source"] == "bundled:muse_news/privleak/forget.jsonl"
    assert sources["forget_eval"]["source"] == "bundled:tofu/forget01_perturbed.jsonl"
    # the tiny fallback was chosen before the hash and says what it replaced
    assert sources["retain"] == {"path": "muse-bench/MUSE-News", "name": "privleak", "split": "retain",
                                 "source": "bundled:muse_news/privleak/retain.jsonl",
                                 "instead_of": "muse-bench/MUSE-News/raw:retain1"}
    # corpus format: two long news texts give many 256-token chunks, not one item per row
    assert config["plan"]["micro_batches_per_epoch"] > 1 + 1

    # The tree describes itself: the report needs no --include-tasks to find the family's layout.
    _, md, _ = run_cli("report", out)
    lines = md.splitlines()
    head = lines.index("## Mini family · tiny_full")
    header = [c.strip() for c in next(ln for ln in lines[head:] if ln.startswith("|")).strip("|").split("|")]
    # column groups in the family's split_order (not the task order), each with the family's columns
    assert header == ["method", "second forget_Q_A_ROUGE ↓", "second forget_Q_A_Prob ↓",
                      "first forget_Q_A_ROUGE ↓", "first forget_Q_A_Prob ↓"]
    assert "mini_a" not in md and "TOFU" not in md  # one family table, no per-task fallback tables
    assert any(ln.startswith("| GradDiff") for ln in lines[head:])
    png = tmp_path / "fig.png"
    run_cli("report", out, "--plot", png)
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("fragment, needle", [
    ("report:\n  title: X\n  colums: [a]\n", "report: unknown key 'colums' (did you mean 'columns'?)"),
    ("report:\n  plot: {x: a, y: b, logy: true}\n", "report plot: unknown key 'logy' (did you mean 'log_y'"),
    ("training: {format: corpus, idk: {rol: idk}}\n", "training.idk: unknown key 'rol' (did you mean 'role'?)"),
    ("training: {format: chunks}\n", "training.format: 'chunks' is not one of qa, corpus"),
    ("finetune: {data: {path: x/y}, split: [a]}\n", "finetune: unknown key 'split' (did you mean 'splits'?)"),
    ("data:\n  retain: {path: x/y, tiny_fallback: {nme: a}}\n", "tiny_fallback: unknown key 'nme'"),
])
def test_unknown_key_in_the_new_blocks_is_one_line_naming_the_file(tmp_path, fragment, needle):
    # the fragment is merged over the family's base by include: (a repeated key in one file is an error)
    d = family_dir(tmp_path, {"_base.yaml": BASE, "bad.yaml": "task: bad\ninclude: _base.yaml\n" + fragment})
    rc, _, err = run_cli("ls", "tasks", "--include-tasks", d, check=False)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(d / "bad.yaml") in lines[0] and needle in lines[0], lines[0]


def _cells(monkeypatch, task="tofu_forget01", **kw):
    from harness.commands.run import expand
    from harness.options import RunOptions
    from harness.plugins import get_registry

    opts = RunOptions(tasks=task, methods="npo", output="res", **kw)
    return expand(opts, get_registry())


def test_hub_and_offline_runs_get_different_run_directories(monkeypatch):
    monkeypatch.setattr(hub, "hub_available", lambda: False)
    offline = _cells(monkeypatch)[0]
    monkeypatch.setattr(hub, "hub_available", lambda: True)
    online = _cells(monkeypatch)[0]
    assert offline.dir != online.dir
    assert offline.config["data_sources"]["forget"]["source"] == "bundled:tofu/forget01.jsonl"
    assert offline.config["data_sources"]["idk"]["source"] == "bundled:tofu/idk.jsonl"
    assert {r["source"] for r in online.config["data_sources"].values()} == {"hub"}
    # the task config itself is the same: only the recorded sources differ
    assert offline.config["task"] == online.config["task"]


def test_tiny_muse_retain_fallback_is_decided_before_the_hash(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_available", lambda: False)
    offline = _cells(monkeypatch, "muse_news")[0]
    retain = offline.config["data_sources"]["retain"]
    assert retain["split"] == "retain" and retain["instead_of"] == "muse-bench/MUSE-News/raw:retain1"
    assert offline.task.data["retain"].source == "bundled:muse_news/privleak/retain.jsonl"  # what training reads
    # the profile's substitution (privleak forget documents) is resolved too
    assert offline.config["data_sources"]["forget"]["source"] == "bundled:muse_news/privleak/forget.jsonl"
    monkeypatch.setattr(hub, "hub_available", lambda: True)
    online = _cells(monkeypatch, "muse_news")[0]
    assert online.config["data_sources"]["retain"] == {"path": "muse-bench/MUSE-News", "name": "raw",
                                                       "split": "retain1", "source": "hub"}
    assert online.dir != offline.dir
    # a --data-dir copy of raw/retain1 wins over the fallback, and is named relative to --data-dir
    monkeypatch.setattr(hub, "hub_available", lambda: False)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "retain1.jsonl").write_text('{"text": "A retain document."}\n')
    local = _cells(monkeypatch, "muse_news", data_dir=str(tmp_path))[0]
    assert local.config["data_sources"]["retain"]["source"] == "data_dir:raw/retain1.jsonl"
    assert len({offline.dir, online.dir, local.dir}) == 3


def test_a_split_resolved_to_the_hub_is_never_read_from_the_bundled_copy(monkeypatch):
    from harness import HarnessError
    from harness.data.splits import load_split, resolved
    from harness.tasks import DataSpec

    spec = DataSpec("locuslab/TOFU", "forget01", "train")
    monkeypatch.setattr(hub, "hub_available", lambda: True)
    pinned = resolved(spec)
    assert pinned.source == "hub"
    # the hub is not reachable from the tests, so the read fails instead of using the bundled copy
    with pytest.raises(HarnessError, match=r"locuslab/TOFU/forget01:train: this run was set up to read it from the hub"):
        load_split(pinned)
    monkeypatch.setattr(hub, "hub_available", lambda: False)
    bundled = resolved(spec)
    assert bundled.source == "bundled:tofu/forget01.jsonl" and len(load_split(bundled)) == 40
    assert dataclasses.replace(bundled, source="bundled:tofu/nope.jsonl") != bundled
    with pytest.raises(HarnessError, match="is gone"):
        load_split(dataclasses.replace(bundled, source="bundled:tofu/nope.jsonl"))


def test_finetune_recipe_comes_from_the_task_yaml(tmp_path):
    from harness import HarnessError
    from harness.commands.finetune import recipe_task
    from harness.options import FinetuneOptions

    task = recipe_task(FinetuneOptions(model="tiny:base", split="retain99"))
    assert task.finetune.spec("retain99").label() == "locuslab/TOFU/retain99:train"
    with pytest.raises(HarnessError, match=r"--split 'retain42': use one of .*retain99"):
        recipe_task(FinetuneOptions(model="tiny:base", split="retain42"))
    # a family of its own offering 'full' too: ambiguous without --task, chosen with it
    d = family_dir(tmp_path, {"ft.yaml": "task: ft_own\n" + BASE.split("report:")[0]
                              + "finetune: {data: {path: muse-bench/MUSE-News, split: forget}, splits: [full]}\n"})
    opts = FinetuneOptions(model="tiny:base", split="full", include_tasks=[str(d)])
    with pytest.raises(HarnessError, match="several finetune recipes.*--task"):
        recipe_task(opts)
    assert recipe_task(dataclasses.replace(opts, task="ft_own")).finetune.path == "muse-bench/MUSE-News"
    assert recipe_task(dataclasses.replace(opts, task="tofu_forget01")).name == "tofu_forget01"


def test_own_task_on_the_tofu_base_keeps_a_table_of_its_own(tmp_path):
    """It inherits TOFU's layout but names no split: it must not become an empty TOFU column group."""
    from conftest import cheap_task_yaml

    from harness import report
    from harness.tasks import parse_task

    f = tmp_path / "t_cheap.yaml"
    f.write_text(cheap_task_yaml("t_cheap", "cheap"))
    task = parse_task(f)
    assert task.benchmark == "TOFU" and task.report.split is None
    run = tmp_path / "res" / "tiny_full" / "t_cheap" / "npo" / "abcd1234-s0"
    run.mkdir(parents=True)
    (run / "scores.json").write_text(json.dumps({
        "task": "t_cheap", "method": "npo", "model": "tiny_full", "benchmark": task.benchmark,
        "report": task.report.to_dict(), "metrics": {"forget_Q_A_Prob": {"value": 0.5, "better": "higher"}}}))
    tables = report.build_tables(report.build_cells(report.load_runs(tmp_path / "res")))
    assert [(t.title, t.metrics, t.splits) for t in tables] == [("t_cheap", ["forget_Q_A_Prob"], [("t_cheap", "t_cheap")])]
