"""Every input is checked before any work starts, --dry-run included: flag values, --data-dir, --template,
checkpoint weights and reference logs each fail with one line naming the flag, file or field (exit 2).
(The cases of test_bad_input.py, in a module of their own to keep each under 500 lines.)"""

import json
import shutil

import pytest
import test_bad_input as bad
from conftest import ROOT, run_cli
from test_bad_input import CHEAP_TASK, one_error, task_dir

# the fixtures of test_bad_input.py: a fresh registry per test, a finished result no failure may touch
fresh_registry, finished = bad.fresh_registry, bad.finished

LOGS = ROOT / "harness" / "bundled" / "reference_logs"
RUN = ["run", "-t", "tofu_forget01", "-m", "npo", "--dry-run"]


# ------------------------------------------------------------------------------------------ flag values
@pytest.mark.parametrize("extra, needle", [
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--lr=-1e-5"], "--lr must be positive, got -1e-05"),
    (["--epochs", "0"], "--epochs must be positive, got 0.0"),
    (["--epochs", "1.5"], "--epochs must be a whole number, got 1.5"),
    (["--train-batch-size", "0"], "--train-batch-size must be positive, got 0"),
    (["--per-device-batch", "-2"], "--per-device-batch must be positive, got -2"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be positive, got 0"),
    (["--limit", "0"], "--limit must be positive, got 0"),
    (["--max-length", "0"], "--max-length must be positive, got 0"),
    (["--seeds", "0,1,0"], "--seeds '0,1,0': 0 given more than once"),
    (["--seeds", ""], "--seeds '': give at least one name"),
    (["-m", "npo,npo"], "--methods 'npo,npo': npo given more than once"),
    (["-m", "npo,"], "--methods 'npo,': empty item (stray comma)"),
    (["-t", "tofu_forget01,tofu_forget01"], "--tasks 'tofu_forget01,tofu_forget01': tofu_forget01 given more"),
])
def test_bad_flag_values(finished, extra, needle):
    rc, _, err = run_cli(*RUN, "-o", finished, *extra, check=False)
    assert rc == 2
    one_error(rc, err, needle)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "-t", ""], "--tasks '': give at least one name"),
    (["eval", "-t", "tofu_forget01", "--eval-batch-size", "-1"], "--eval-batch-size must be positive"),
    (["finetune", "--model", "tiny:base", "-o", "x", "--lr", "0"], "--lr must be positive"),
    (["finetune", "--model", "tiny:base", "-o", "x", "--weight-decay", "-1"], "--weight-decay must be a finite"),
])
def test_bad_flag_values_of_eval_and_finetune(tmp_path, argv, needle):
    rc, _, err = run_cli(*argv, check=False)
    assert rc == 2
    one_error(rc, err, needle)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------- --data-dir
def test_data_dir_that_does_not_exist_or_holds_none_of_the_splits(tmp_path, finished):
    missing = tmp_path / "nowhere"
    for verb in (RUN, ["eval", "-t", "tofu_forget01", "--limit", "2"]):
        rc, _, err = run_cli(*verb, "-o", finished, "--data-dir", missing, check=False)
        one_error(rc, err, f"--data-dir {missing}: no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "forget_01.jsonl").write_text('{"question": "q", "answer": "a"}\n')  # a typo is not the split
    rc, _, err = run_cli(*RUN, "-o", finished, "--data-dir", empty, check=False)
    one_error(rc, err, f"--data-dir {empty} holds none of the splits task 'tofu_forget01' reads",
              str(empty / "forget01.jsonl"))


def test_partial_data_dir_names_what_comes_from_the_bundled_copies(tmp_path, finished, caplog):
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(ROOT / "harness" / "bundled" / "tofu" / "forget01.jsonl", part / "forget01.jsonl")
    with caplog.at_level("WARNING", logger="harness"):
        run_cli(*RUN, "-o", finished, "--data-dir", part)
    assert f"--data-dir {part} holds no file for task 'tofu_forget01' data role(s)" in caplog.text
    assert "retain (retain99.jsonl)" in caplog.text and "using the bundled copies" in caplog.text


# ----------------------------------------------------------------------------------------- --template
@pytest.mark.parametrize("text, needle", [
    ("", "the template is empty"),
    ("template_args:\n", "the template is empty"),
    ('user_start_tag: "<|user|>"\nuser_end_tag: ""\nasst_start_tag: "<|assistant|>"\n',
     "missing template key(s) asst_end_tag"),
    ('apply_chat_template: "yes"\n', "apply_chat_template must be true or false"),
    ("user_start_tag: [a]\nuser_end_tag: b\nasst_start_tag: c\nasst_end_tag: d\n", "user_start_tag must be a string"),
])
def test_incomplete_template_file(tmp_path, finished, text, needle):
    f = tmp_path / "template.yaml"
    f.write_text(text)
    rc, _, err = run_cli(*RUN, "--model", "tiny:full", "--template", f, "-o", finished, check=False)
    one_error(rc, err, f"--template {f}: {needle}")


# ------------------------------------------------------------------------------------- checkpoint weights
def test_checkpoint_whose_weights_do_not_cover_the_model(tmp_path, tiny_full_dir, finished):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "partial"
    shutil.copytree(tiny_full_dir, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    d = task_dir(tmp_path, {"t7_cheap.yaml": CHEAP_TASK})
    rc, _, err = run_cli("eval", "-t", "t7_cheap", "--model", ckpt, "--include-tasks", d, "--limit", "2",
                         "-o", finished, check=False)
    one_error(rc, err, f"{ckpt}: the checkpoint's weights do not cover the model: 1 tensor(s) missing "
                       "(model.layers.1.mlp.up_proj.weight)")
    assert not list(finished.rglob("t7_cheap/**/scores.json"))


# -------------------------------------------------------------------------------------- reference logs
def _log(tmp_path, edit=None, source="tofu_Llama-2-7b-chat-hf_retain99/TOFU_EVAL.json"):
    doc = json.loads((LOGS / source).read_text())
    if edit:
        edit(doc)
    f = tmp_path / "ref" / "TOFU_EVAL.json"
    f.parent.mkdir(exist_ok=True)
    f.write_text(json.dumps(doc))
    return f


def _vbi(doc):
    return doc["forget_truth_ratio"]["value_by_index"]


@pytest.mark.parametrize("make, needle", [
    (lambda p: LOGS / "muse_Llama-2-7b-hf_News_retrain" / "MUSE_EVAL.json",
     "is a MUSE log but the task is a TOFU task"),
    (lambda p: _log(p, lambda d: _vbi(d)["3"].update(score="high")),
     "'forget_truth_ratio' value_by_index[3].score: expected a number, got \"high\""),
    (lambda p: _log(p, lambda d: _vbi(d)["5"].update(score=float("nan"))),
     "'forget_truth_ratio' value_by_index[5].score: expected a finite number, got nan"),
    (lambda p: _log(p, lambda d: d["mia_min_k"].update(agg_value=float("inf"))),
     "'mia_min_k' agg_value: expected a finite number, got inf"),
], ids=["other_benchmark", "non_numeric", "nan", "inf"])
def test_reference_log_that_does_not_fit_fails_in_dry_run(tmp_path, finished, make, needle):
    log = make(tmp_path)
    rc, _, err = run_cli(*RUN, "--model", "tiny:full", "--reference", log, "-o", finished, check=False)
    one_error(rc, err, str(log), needle)


@pytest.mark.parametrize("source, edit, limit, needle", [
    ("tofu_Llama-2-7b-chat-hf_retain99/TOFU_EVAL.json",
     lambda d: d["forget_truth_ratio"].update(value_by_index={"0": _vbi(d)["0"]}), ["--limit", "2"],
     "'forget_truth_ratio' has 1 samples but task 't7_fq' scored 2 rows (--limit)"),
    ("tofu_Llama-2-7b-chat-hf_retain95/TOFU_EVAL.json", None, [],
     "'forget_truth_ratio' has 200 samples but task 't7_fq' scored 40 rows: the log is of another split"),
], ids=["fewer_samples", "other_split"])
def test_reference_log_of_other_rows_is_refused(tmp_path, finished, source, edit, limit, needle):
    log = _log(tmp_path, edit, source)
    d = task_dir(tmp_path, {"t7_fq.yaml": CHEAP_TASK.replace("[forget_Q_A_Prob]", "[forget_quality]")})
    rc, _, err = run_cli("eval", "-t", "t7_fq", "--model", "tiny:full", "--reference", log, "--include-tasks", d,
                         *limit, "-o", finished, check=False)
    one_error(rc, err, str(log), needle)
    assert not list(finished.rglob("t7_fq/**/scores.json"))
