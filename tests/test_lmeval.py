"""The lm_eval metric through the real lm-eval package, and the WMDP family, offline on the tiny model.

Small multiple-choice lm-eval tasks in lm-eval's own custom-task YAML format over JSONL files written here
(found through an include path, so lm-eval's built-in task index is never scanned), and a fake WMDP corpus
made from bundled MUSE text."""

import json
import math
import sys

import pytest
from conftest import ROOT, cheap_task_yaml, run_cli

from harness import HarnessError

pytest.importorskip("lm_eval", reason="the lmeval extra (pip install 'unlearn-harness[lmeval]') is not installed")

QUESTIONS = [  # choices carry no leading space: lm-eval's target_delimiter " " adds it
    {"question": "What did the author write about the sea?", "choices": ["a novel", "nothing at all"]},
    {"question": "Where was the writer born?", "choices": ["in a small town", "under the sea", "on the moon"]},
]
MC_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def _hand_loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), split the way lm-eval's HFLM splits a pair: encode
    context + continuation and the context alone (tokenizer defaults, so BOS), the rest is the continuation."""
    import torch

    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


@pytest.fixture(scope="module")
def tiny(tiny_full_dir):
    from harness.models.load import load_model, load_tokenizer

    return load_model(str(tiny_full_dir)), load_tokenizer(str(tiny_full_dir))


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory, tiny):
    """Custom lm-eval tasks: ``mcq_two`` (answers set so that the model gets exactly one right), ``mcq_b``,
    the group ``mcq_group`` of both, and ``hub_only`` whose dataset lives only on the hub."""
    model, tok = tiny
    d = tmp_path_factory.mktemp("lm_tasks")
    rows = []
    for n, q in enumerate(QUESTIONS):
        ll = [_hand_loglik(model, tok, f"{q['question']}\nAnswer:", " " + c) for c in q["choices"]]
        best = max(range(len(ll)), key=ll.__getitem__)
        # question 0: the model's choice is the answer; question 1: it is not
        answer = best if n == 0 else (best + 1) % len(ll)
        rows.append({**q, "answer": answer, "loglik": ll})
    (d / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "b.jsonl").write_text(json.dumps({**QUESTIONS[0], "answer": 0}) + "\n")
    (d / "mcq_two.yaml").write_text(MC_TASK.format(name="mcq_two", data=d / "two.jsonl"))
    (d / "mcq_b.yaml").write_text(MC_TASK.format(name="mcq_b", data=d / "b.jsonl"))
    (d / "mcq_group.yaml").write_text("group: mcq_group\ntask: [mcq_two, mcq_b]\naggregate_metric_list:\n"
                                      "  - {metric: acc, aggregation: mean, weight_by_size: true}\n"
                                      "metadata: {version: 1}\n")
    (d / "hub_only.yaml").write_text(MC_TASK.format(name="hub_only", data="x").replace(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x\n", "dataset_path: nobody/uncached-mcq\n"))
    return d, rows


def _task(tmp_path, metrics: str):
    from harness.tasks import parse_task

    f = tmp_path / "t.yaml"
    f.write_text(f"task: lmcheck\ndata:\n  forget: {{path: locuslab/TOFU, name: forget01}}\nmetrics:\n{metrics}")
    return parse_task(f)


def test_two_question_accuracy_by_hand(tmp_path, tiny, lm_tasks):
    """acc = mean(argmax loglik == answer) = 1/2 and its stderr = sample std / sqrt(n) = 0.5; every
    per-choice log-likelihood lm-eval logged equals the hand-computed one."""
    from harness.scoring.evaluate import evaluate_task

    model, tok = tiny
    d, rows = lm_tasks
    task = _task(tmp_path, f"  - {{name: lm_eval, tasks: [mcq_two], include_path: {d}, batch_size: 2}}\n")
    out = tmp_path / "run"
    scores = evaluate_task(task, model, tok, None, out_dir=out, progress=False)
    part = scores["lm_eval"].parts["mcq_two/acc"]
    assert part.value == 0.5 and part.stderr == pytest.approx(0.5) and part.better == "higher"
    doc = json.loads((out / "scores.json").read_text())
    assert doc["metrics"] == {"mcq_two/acc": {"value": 0.5, "better": "higher", "version": 1, "top_level": True,
                                              "stderr": pytest.approx(0.5), "part_of": "lm_eval"}}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [0, 1] and [s["acc"] for s in samples] == [1.0, 0.0]
    for s, row in zip(samples, rows):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(row["loglik"], abs=1e-4)
    assert json.loads((out / "LMEval_SUMMARY.json").read_text()) == {"mcq_two/acc": 0.5,
                                                                     "mcq_two/acc_stderr": pytest.approx(0.5)}
    assert list(json.loads((out / "LMEval_EVAL.json").read_text())) == ["mcq_two"]
    assert not (out / "LMCHECK_EVAL.json").exists()  # no metric of the task's own export was computed


def test_group_reports_group_level_entries(tmp_path, tiny, lm_tasks):
    from harness.metrics.lmeval import with_overrides
    from harness.scoring.evaluate import evaluate_task

    model, tok = tiny
    d, _ = lm_tasks
    task = _task(tmp_path, "  - {name: lm_eval, tasks: [mcq_b]}\n")
    metrics = with_overrides(task.metrics, tasks=["mcq_group"], include=[str(d)], limit=5)
    scores = evaluate_task(task, model, tok, None, metrics=metrics, progress=False)
    parts = scores["lm_eval"].parts
    assert list(parts) == ["mcq_group/acc"]
    # weighted by size: (1 + 0 + 1) / 3 over the two questions of mcq_two and the one of mcq_b
    assert parts["mcq_group/acc"].value == pytest.approx(2 / 3)
    assert {r["task"] for r in scores["lm_eval"].rows} == {"mcq_two", "mcq_b"}


def test_overrides_and_utility():
    from harness.metrics.lmeval import with_overrides

    base = [("forget_Q_A_Prob", {}), ("lm_eval", {"tasks": ["wmdp_bio", "mmlu"], "num_fewshot": 0})]
    assert with_overrides(base, tasks=["arc_easy"], limit=3)[1] == ("lm_eval", {"tasks": ["arc_easy"], "num_fewshot": 0,
                                                                                "limit": 3})
    assert with_overrides(base, utility=["mmlu", "hellaswag"])[1][1]["tasks"] == ["wmdp_bio", "mmlu", "hellaswag"]
    assert with_overrides(base[:1], utility=["mmlu"]) == [("forget_Q_A_Prob", {}), ("lm_eval", {"tasks": ["mmlu"]})]
    assert with_overrides(base[:1], num_fewshot=5) == base[:1]  # no lm_eval entry, nothing to set


def test_offline_hub_task_and_unknown_task_are_one_line_errors(tmp_path, tiny, lm_tasks, wmdp_corpus):
    from lm_eval.tasks import TaskManager

    from harness.metrics import lmeval
    from harness.scoring.evaluate import evaluate_task

    model, tok = tiny
    d, _ = lm_tasks
    task = _task(tmp_path, f"  - {{name: lm_eval, tasks: [hub_only], include_path: {d}}}\n")
    with pytest.raises(HarnessError, match=r"lm-eval task 'hub_only'.*must be in the Hugging Face datasets cache "
                                           r"or the hub reachable") as e:
        evaluate_task(task, model, tok, None, progress=False)
    assert "\n" not in str(e.value)
    # harness run checks lm-eval tasks with the data, before training (so no unlearning work is lost)
    rc, _, err = run_cli("run", "-t", "wmdp_cyber", "-m", "grad_diff", "--model", "tiny:full", "--dry-run",
                         "--data-dir", wmdp_corpus, "--lm-eval-tasks", "hub_only", "--lm-eval-include", d, check=False)
    assert rc != 0 and "lm-eval task 'hub_only'" in err and len(err.strip().splitlines()) == 1
    tm = TaskManager(include_path=str(d), include_defaults=False)
    with pytest.raises(HarnessError, match=r"unknown lm-eval task 'mcq_tow' \(did you mean 'mcq_two'"):
        lmeval._load(tm, "mcq_tow", "lmcheck")


def test_missing_extra_names_it(tmp_path, monkeypatch):
    (tmp_path / "t.yaml").write_text(cheap_task_yaml("cheap_util", "cheap"))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    rc, _, err = run_cli("eval", "-t", "cheap_util", "--model", "tiny:full", "--utility", "mmlu",
                         "--include-tasks", tmp_path, "-o", tmp_path / "out", check=False)
    assert rc != 0 and "pip install 'unlearn-harness[lmeval]'" in err and len(err.strip().splitlines()) == 1


def test_text_builder_rows(tmp_path):
    from harness.data.splits import load_split
    from harness.tasks import DataSpec

    (tmp_path / "c.jsonl").write_text('{"text": "raw json line"}\nplain text\n\nlast')
    rows = load_split(DataSpec("text", "c"), tmp_path)
    assert rows == [{"text": '{"text": "raw json line"}'}, {"text": "plain text"}, {"text": ""}, {"text": "last"}]


def test_wmdp_missing_corpus_is_one_line_error(tmp_path):
    rc, _, err = run_cli("run", "-t", "wmdp_cyber", "-m", "grad_diff", "--model", "tiny:full", "--dry-run",
                         check=False)
    assert rc != 0 and "cyber-forget-corpus.jsonl" in err and "--data-dir" in err and "wmdpcorpora" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "cyber-forget-corpus.jsonl").write_text("a text\n")
    rc, _, err = run_cli("run", "-t", "wmdp_cyber", "-m", "grad_diff", "--model", "tiny:full", "--dry-run",
                         "--data-dir", tmp_path, check=False)
    assert rc != 0 and "retain corpus cyber-retain-corpus.jsonl is not in --data-dir" in err


@pytest.fixture(scope="module")
def wmdp_corpus(tmp_path_factory):
    """A fake WMDP cyber corpus pair from the bundled MUSE-News texts, one text per line."""
    d = tmp_path_factory.mktemp("wmdp")
    src = ROOT / "harness" / "bundled" / "muse_news" / "privleak"
    for role, name in (("forget", "forget"), ("retain", "retain")):
        rows = [json.loads(line) for line in (src / f"{name}.jsonl").read_text().splitlines()[:6]]
        (d / f"cyber-{role}-corpus.jsonl").write_text("".join(r["text"].replace("\n", " ")[:600] + "\n" for r in rows))
    return d


def test_wmdp_published_setup_resolves(wmdp_corpus, lm_tasks):
    """The reference WMDP experiment from the task YAML alone: zephyr-7b-beta, effective batch 16 (1 x 16),
    lr 5e-5, 80 steps, constant schedule, left padding, RMU training only layers 5-7's down projections."""
    d, _ = lm_tasks
    _, out, _ = run_cli("run", "-t", "wmdp_cyber", "-m", "rmu,grad_diff", "--dry-run", "--data-dir", wmdp_corpus,
                        "--lm-eval-tasks", "mcq_two", "--lm-eval-include", d)
    assert out.count("model=zephyr-7b-beta") == 2 and "start: HuggingFaceH4/zephyr-7b-beta" in out
    for setting in ("batch_size: 16", "per_device_batch: 1", "lr: 5.0e-05", "max_steps: 80", "schedule: constant",
                    "padding_side: left", "max_length: 512"):
        assert out.count(setting) == 2, setting
    assert r"trainable_params: model\.layers\.(5|6|7)\.mlp\.down_proj\.weight" in out


def test_wmdp_idk_dpo_and_tiny_profile(wmdp_corpus, lm_tasks):
    """`--model tiny` covers the WMDP tasks (start: the TOFU-finetuned tiny model, no retain reference), and a
    method that needs idk answers is refused on a corpus task before anything runs, naming method and task."""
    d, _ = lm_tasks
    _, out, _ = run_cli("run", "-t", "wmdp_cyber", "-m", "grad_diff", "--model", "tiny", "--dry-run", "--data-dir",
                        wmdp_corpus, "--lm-eval-tasks", "mcq_two", "--lm-eval-include", d)
    assert "start: 'tiny:full', reference: null" in out
    rc, _, err = run_cli("run", "-t", "wmdp_cyber", "-m", "idk_dpo", "--model", "tiny", "--dry-run", "--data-dir",
                         wmdp_corpus, "--lm-eval-tasks", "mcq_two", "--lm-eval-include", d, check=False)
    assert rc != 0 and "'idk_dpo'" in err and "wmdp_cyber" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_wmdp_run_end_to_end(tmp_path, wmdp_corpus, lm_tasks):
    """Unlearn a WMDP-style task on the tiny model with the task's training defaults (constant schedule,
    left padding, max_steps across an epoch boundary), score it with lm_eval, see the values in scores.json,
    the export files and the report."""
    d, _ = lm_tasks
    out = tmp_path / "res"
    run_cli("run", "-t", "wmdp_cyber", "-m", "grad_diff", "--model", "tiny:full", "--data-dir", wmdp_corpus,
            "--max-steps", 5, "--max-length", 64, "--lm-eval-tasks", "mcq_two,mcq_b", "--lm-eval-include", d,
            "-o", out)
    run = next((out / "tiny_full" / "wmdp_cyber" / "grad_diff").iterdir())
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["padding_side"] == "left" and cfg["training"]["schedule"] == "constant"
    assert cfg["plan"]["total_steps"] == 5 and cfg["plan"]["epochs"] == 2 and cfg["plan"]["steps_per_epoch"] < 5
    assert cfg["versions"]["lm_eval"] and cfg["fingerprints"]["lm_eval_version"] == cfg["versions"]["lm_eval"]
    assert str(d / "two.jsonl") in cfg["fingerprints"]["lm_eval_include"]  # custom tasks' files are in the identity
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and len({r["lr"] for r in log}) == 1
    doc = json.loads((run / "scores.json").read_text())
    assert set(doc["metrics"]) == {"mcq_two/acc", "mcq_b/acc"} and doc["benchmark"] == "WMDP"
    assert all(math.isfinite(m["value"]) for m in doc["metrics"].values())
    assert doc["metrics"]["mcq_two/acc"]["stderr"] == pytest.approx(0.5)  # one question: lm-eval has no stderr
    assert doc["metrics"]["mcq_b/acc"]["stderr"] is None
    assert {"LMEval_EVAL.json", "LMEval_SUMMARY.json"} <= {p.name for p in run.iterdir()}
    _, text, _ = run_cli("report", out, "--plot", tmp_path / "p.png", "--plot-y", "mcq_*/acc", "--plot-x", "mcq_b/acc")
    assert "## WMDP · tiny_full" in text and "cyber mcq_two/acc ↑" in text and (tmp_path / "p.png").stat().st_size


@pytest.mark.slow
def test_utility_columns_next_to_tofu(tmp_path, lm_tasks):
    """--utility adds lm-eval values to a TOFU task's scores; the report shows them beside the TOFU columns."""
    d, _ = lm_tasks
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cheap.yaml").write_text(cheap_task_yaml("cheap_util", "cheap") + "report: {split: forget01}\n")
    out = tmp_path / "res"
    run_cli("eval", "-t", "cheap_util", "--model", "tiny:full", "--utility", "mcq_two", "--lm-eval-include", d,
            "--include-tasks", tmp_path / "t", "--limit", 4, "-o", out)
    run = next((out / "tiny_full" / "cheap_util" / "eval").iterdir())
    doc = json.loads((run / "scores.json").read_text())
    assert set(doc["metrics"]) == {"forget_Q_A_Prob", "mcq_two/acc"}
    tofu = json.loads((run / "TOFU_SUMMARY.json").read_text())
    assert list(tofu) == ["forget_Q_A_Prob"]  # the TOFU export keeps the open-unlearning layout
    _, text, _ = run_cli("report", out, "--plot", tmp_path / "u.png", "--plot-x", "mcq_two/acc",
                         "--plot-y", "forget_Q_A_Prob")
    assert "mcq_two/acc ↑" in text and "forget_quality" in text and (tmp_path / "u.png").stat().st_size


def test_left_padding_and_max_steps_plan():
    from harness.training import TrainConfig, plan
    from harness.training.loop import method_batch

    a, b = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}
    batch = method_batch([a, b], [b], None, 0, "corrected", "left")
    assert batch["forget"]["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert batch["forget"]["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["forget"]["labels"].tolist() == [[-100, 5, 6], [-100, -100, 7]]
    cfg = TrainConfig(batch_size=16, per_device_batch=1, max_steps=80, epochs=10)
    p = plan(cfg, 100, 1)  # 7 steps per epoch: 80 steps take 12 epochs, the last one cut short
    assert (p["steps_per_epoch"], p["total_steps"], p["epochs"]) == (7, 80, 12)


def test_left_padded_training_matches_the_cached_reference():
    """The reference log-probs are cached from right-padded batches while WMDP trains on left-padded ones: that is
    exact only if a row's log-prob does not depend on its padding (transformers derives positions from the
    attention mask). At the first step the policy equals the reference, so NPO's forget loss on a left-padded
    batch of rows of different lengths must be exactly (2/beta) log 2."""
    import tempfile
    from pathlib import Path

    from harness.io import read_jsonl
    from harness.methods import build_method
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer, tiny_llama, toy_data
    from harness.training import TrainConfig, unlearn

    tok = char_tokenizer()
    forget, retain, _ = toy_data(tok)
    assert len({len(it["input_ids"]) for it in forget}) > 1  # rows of different lengths: padding happens
    method = build_method(get_registry().methods["npo"], {})
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=len(forget), per_device_batch=len(forget), warmup_epochs=0,
                      weight_decay=0.0, schedule="constant", optimizer="adamw_torch", padding_side="left")
    with tempfile.TemporaryDirectory() as tmp:
        unlearn(tiny_llama(tok), tok, method, forget, retain, cfg, out_dir=Path(tmp))
        row = read_jsonl(Path(tmp) / "train_log.jsonl")[0]
    assert row["forget"] == pytest.approx(2 / method.beta * math.log(2), rel=1e-6)
