"""Ecosystem outputs of a run: accelerate trackers (TensorBoard, W&B offline), lm-eval's results file, the model
card and the early --push-to-hub checks. One short real run (cheap task, test-size tiny model) feeds most tests."""

import glob
import json
import os

import pytest
from conftest import cheap_task_yaml, run_cli

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'unlearn-harness[tracking]'")
pytest.importorskip("wandb", reason="the tracking extra: pip install 'unlearn-harness[tracking]'")

# The keys lm-eval 0.4.x writes to results_<time>.json (seen in lm-eval 0.4.13's output of a local task);
# checked against the installed lm-eval's own output when it is present.
LM_EVAL_KEYS = {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date", "pretty_env_info", "transformers_version", "lm_eval_version",
                "upper_git_hash", "tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token", "eot_token_id",
                "max_length", "task_hashes", "model_source", "model_name", "model_name_sanitized",
                "system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
                "chat_template_sha", "total_evaluation_time_seconds"}
LM_EVAL_CONFIG_KEYS = {"model", "model_args", "model_num_parameters", "model_dtype", "model_revision", "model_sha",
                       "batch_size", "batch_sizes", "device", "use_cache", "limit", "bootstrap_iters", "gen_kwargs",
                       "random_seed", "numpy_seed", "torch_seed", "fewshot_seed"}
FLAGS = ["--model", "tiny:full", "--limit", "4", "--epochs", "2", "--train-batch-size", "2",
         "--per-device-batch", "2", "--eval-batch-size", "4"]


def _tasks(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    (d / "t18_cheap.yaml").write_text(cheap_task_yaml("t18_cheap", "forget01, one cheap metric"))
    return d


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One NPO run reported to TensorBoard and W&B (offline), with --save-model."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_cli("run", "-t", "t18_cheap", "-m", "npo", *FLAGS, "--include-tasks", _tasks(tmp), "-o", tmp / "res",
                "--report-to", "tensorboard,wandb", "--tracker-project", "t18-project", "--save-model")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (run,) = (tmp / "res").glob("tiny_full/t18_cheap/npo/*-s0")
    return run


def test_tensorboard_events_hold_the_logged_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (tracked / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 4 forget rows / batch 2 x 2 epochs
    logdir = tracked / "tensorboard" / tracked.name  # run name = the run directory's name
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "forget", "retain", "grad_norm", "lr"):
        assert f"train/{key}" in tags, tags
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-12)
    scores = json.loads((tracked / "scores.json").read_text())
    (final,) = acc.Scalars("eval/forget_Q_A_Prob")
    assert final.step == rows[-1]["step"]
    assert final.value == pytest.approx(scores["metrics"]["forget_Q_A_Prob"]["value"], rel=1e-6)
    # the resolved config went in as hyper-parameters
    (hparams,) = logdir.glob("*/hparams.yml")
    text = hparams.read_text()
    assert "method.name: npo" in text and "method.params.beta: 0.1" in text and "training.lr:" in text


def test_wandb_offline_writes_its_run_directory(tracked):
    runs = list((tracked / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 1, list((tracked / "wandb").rglob("*"))[:20]
    (log,) = runs[0].glob("run-*.wandb")  # W&B's record log, synced later with `wandb sync`
    data = log.read_bytes()
    # the run's name, project, resolved config and logged scalars are in its records
    for needle in (tracked.name, "t18-project", "method.params.beta", "train/loss", "train/grad_norm", "train/lr",
                   "eval/forget_Q_A_Prob"):
        assert needle.encode() in data, needle


def _lm_eval_own_output(tmp_path, model_dir) -> dict:
    """lm-eval's own results file for a 3-row local loglikelihood task on the tiny model."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    d = tmp_path / "lm_task"
    d.mkdir()
    (d / "rows.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n"
                                          for q, a in [("Who?", " Alice"), ("Where?", " Paris"), ("When?", " 1990")]))
    (d / "t18_local.yaml").write_text(
        "task: t18_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'rows.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    args = f"pretrained={model_dir},dtype=float32"
    res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["t18_local"], batch_size=2, device="cpu",
                                  task_manager=TaskManager(include_path=str(d)), bootstrap_iters=0)
    res.pop("samples", None)
    tracker = EvaluationTracker(output_path=str(tmp_path / "lm_out"))
    tracker.general_config_tracker.log_experiment_args(model_source="hf", model_args=args, system_instruction=None,
                                                       chat_template=None, fewshot_as_multiturn=False)
    tracker.save_results_aggregated(results=res, samples=None)
    (path,) = glob.glob(str(tmp_path / "lm_out" / "*" / "results_*.json"))
    return json.loads(open(path).read())


def test_lm_eval_results_file_has_the_keys_lm_eval_writes(tracked, tmp_path, tiny_full_dir):
    (path,) = tracked.glob("results_*.json")
    doc = json.loads(path.read_text())
    keys, config_keys = LM_EVAL_KEYS, LM_EVAL_CONFIG_KEYS
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        own = None
    else:
        own = _lm_eval_own_output(tmp_path, tiny_full_dir)
        keys, config_keys = set(own), set(own["config"])
    assert keys <= set(doc), keys - set(doc)
    assert config_keys <= set(doc["config"]), config_keys - set(doc["config"])
    scores = json.loads((tracked / "scores.json").read_text())
    row = doc["results"]["t18_cheap"]
    assert row["alias"] == "t18_cheap"
    assert row["forget_Q_A_Prob,none"] == scores["metrics"]["forget_Q_A_Prob"]["value"]
    assert row["forget_Q_A_Prob_stderr,none"] == "N/A"
    assert doc["versions"] == {"t18_cheap": 1} and doc["n-shot"] == {"t18_cheap": 0}
    assert doc["higher_is_better"]["t18_cheap"]["forget_Q_A_Prob"] is False  # forget probability: lower is better
    assert doc["n-samples"]["t18_cheap"]["effective"] == 4
    assert doc["config"]["model_args"].startswith(f"pretrained={tracked / 'model'},base_model=tiny:full,method=npo")
    assert doc["config"]["limit"] == 4 and isinstance(doc["date"], float)
    if own is not None:
        assert set(own["results"]["t18_local"]) - {"acc,none", "acc_stderr,none"} <= set(row)
        assert isinstance(own["tokenizer_pad_token"][1], str) and isinstance(doc["tokenizer_pad_token"][1], str)
        from lm_eval.utils import make_table

        table = make_table(doc)  # lm-eval's own table renderer reads our file
        assert "t18_cheap" in table and "forget_Q_A_Prob" in table and "↓" in table
    # the baseline eval of the start model (harness eval's path) writes one too
    (base,) = tracked.parent.parent.glob("finetuned/*/results_*.json")
    base_doc = json.loads(base.read_text())
    assert base_doc["config"]["model_args"].startswith("pretrained=tiny:full,") and base_doc["model_name"] == "tiny:full"


def test_model_card_renders_the_scores(tracked):
    from harness.results.tables import console_value

    card = (tracked / "model" / "README.md").read_text()
    scores = json.loads((tracked / "scores.json").read_text())
    value = console_value(scores["metrics"]["forget_Q_A_Prob"]["value"])
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"| forget_Q_A_Prob | {value} | ↓ |" in card
    assert "| beta | `0.1` |" in card and "| lr |" in card  # method hyper-parameters and training settings
    assert "base model: `tiny:full`" in card and "Partial run (`--limit 4`)" in card
    import shlex

    import yaml

    command = yaml.safe_load((tracked / "config.yaml").read_text())["command"]  # the process's argv, as recorded
    assert f"```bash\n{shlex.join(['harness', *command[1:]])}\n```" in card


def test_model_card_names_a_hub_base_model():
    from harness.results.card import model_card

    scores = {"task": "tofu_forget01", "model": "llama2", "seed": 0, "partial": False,
              "metrics": {"forget_quality": {"value": 0.5, "better": "higher", "top_level": True},
                          "privleak": {"value": -1.5, "better": "zero", "top_level": True},
                          "forget_truth_ratio": {"value": 0.6, "better": "higher", "top_level": False}}}
    config = {"task": {"task": "tofu_forget01", "version": 1},
              "model": {"start": "open-unlearning/tofu_Llama-2-7b-chat-hf_full", "profile": "llama2-7b-chat"},
              "method": {"name": "npo", "params": {"beta": 0.1, "alpha": 1.0}}, "training": {"lr": 1e-5}}
    card = model_card(scores, config, command=["run", "-t", "tofu_forget01", "-m", "npo"], repo_id="me/tofu-npo")
    assert "base_model: open-unlearning/tofu_Llama-2-7b-chat-hf_full" in card
    assert "| forget_quality | 0.5 | ↑ |" in card and "| privleak | -1.5 | →0 |" in card
    assert "forget_truth_ratio" not in card  # the table shows the task's top-level metrics
    assert "# me/tofu-npo" in card and "harness run -t tofu_forget01 -m npo" in card


def _one_error(rc, err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def test_push_to_hub_offline_fails_before_training(tmp_path):
    out = tmp_path / "res"
    rc, _, err = run_cli("run", "-t", "t18_cheap", "-m", "npo", *FLAGS, "--include-tasks", _tasks(tmp_path), "-o", out,
                         "--push-to-hub", "me/t18", check=False)
    line = _one_error(rc, err)
    assert "--push-to-hub: offline" in line and "HF_HUB_OFFLINE" in line, line
    assert not list(out.rglob("train_log.jsonl")) and not list(out.rglob("scores.json"))  # nothing trained


def test_push_to_hub_checks_repo_ids_before_training(tmp_path):
    common = ["run", "-t", "t18_cheap", "-m", "npo", *FLAGS, "--include-tasks", _tasks(tmp_path), "-o", tmp_path / "r"]
    line = _one_error(*run_cli(*common, "--seeds", "0,1", "--push-to-hub", "me/t18", check=False)[::2])
    assert "2 runs would push to the same repository" in line and "{seed}" in line
    line = _one_error(*run_cli(*common, "--push-to-hub", "me/bad name!", check=False)[::2])
    assert "not a valid repository id" in line
    line = _one_error(*run_cli(*common, "--private", check=False)[::2])
    assert "--private applies to --push-to-hub" in line


def test_missing_or_unknown_tracker_is_one_line_before_training(tmp_path, monkeypatch):
    import importlib.util

    from harness.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "res"
    common = ["run", "-t", "t18_cheap", "-m", "npo", *FLAGS, "--include-tasks", _tasks(tmp_path), "-o", out]
    line = _one_error(*run_cli(*common, "--report-to", "tensorboard,wandb", check=False)[::2])
    assert "the 'wandb' package is not installed; pip install wandb" in line and "[tracking]" in line, line
    line = _one_error(*run_cli(*common, "--report-to", "tensorbord", check=False)[::2])
    assert "unknown tracker" in line and "'tensorboard'" in line, line
    assert not list(out.rglob("train_log.jsonl"))


def test_push_uploads_model_card_and_results_in_one_commit(tracked, monkeypatch):
    """The upload itself needs the hub; what it sends is checked with huggingface_hub's API object stubbed."""
    import huggingface_hub

    from harness.results.hub_push import push_run

    calls = []

    class Api:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="m",
                                              commit_description="", oid="1")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    url = push_run("me/t18", tracked, private=True)
    assert url == "https://huggingface.co/me/t18/commit/1"
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]  # one commit
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    paths = calls[1][2]
    assert {"README.md", "config.json", "model.safetensors"} <= set(paths)
    (lm,) = tracked.glob("results_*.json")
    assert {"results/scores.json", "results/config.yaml", "results/train_log.jsonl", f"results/{lm.name}",
            "results/TOFU_EVAL.json"} <= set(paths)
    assert not any("tensorboard" in p or "wandb" in p for p in paths)


def test_finetune_checks_its_trackers_first(tmp_path):
    rc, _, err = run_cli("finetune", "--model", "tiny:base", "-o", tmp_path / "ft", "--report-to", "wandbb",
                         check=False)
    assert "unknown tracker" in _one_error(rc, err) and not (tmp_path / "ft").exists()
