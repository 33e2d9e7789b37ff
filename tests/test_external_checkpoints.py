"""Checkpoints trained elsewhere: `harness eval --model DIR` on odd tokenizers and configs works, or fails
with one line that says what to pass; custom model code runs only with --trust-remote-code."""

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, cheap_task_yaml, run_cli

from harness import HarnessError, plugins
from harness.models.load import check_checkpoint, check_lengths, load_model, load_tokenizer

TASK = cheap_task_yaml("t7_ext", "forget01 with one cheap metric, for outside checkpoints")
TEMPLATE = """\
apply_chat_template: false
user_start_tag: "<|user|>"
user_end_tag: ""
asst_start_tag: "<|assistant|>"
asst_end_tag: "\\n"
"""
# renders exactly what TEMPLATE renders, so the two routes must give the same numbers
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_full_dir):
    base = tmp_path_factory.mktemp("ext")
    (base / "tasks").mkdir()
    (base / "tasks" / "t7_ext.yaml").write_text(TASK)
    (base / "template.yaml").write_text(TEMPLATE)
    return base


def _variant(env, name, tiny_full_dir, edit_tokenizer=None, edit_config=None):
    d = env / name
    if d.exists():
        return d
    # a plain outside checkpoint: without the prompt template the tiny directories carry
    shutil.copytree(tiny_full_dir, d, ignore=shutil.ignore_patterns("harness_template.yaml"))
    if edit_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
        edit_tokenizer(tok)
        tok.save_pretrained(d)
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


_RUNS = itertools.count()


def _eval(env, model, *extra, check=True):
    out = env / f"results{next(_RUNS)}"  # a fresh directory: every call scores, none reads an earlier result
    rc, stdout, err = run_cli("eval", "-t", "t7_ext", "--model", model, "--include-tasks", env / "tasks",
                              "--limit", "3", "-o", out, "--attention-mask", "corrected", *extra, check=check)
    return rc, stdout, err


def _value(stdout):
    path = next(line.split("results: ", 1)[1] for line in stdout.splitlines() if line.startswith("results: "))
    return json.loads(open(os.path.join(path, "scores.json")).read())["metrics"]["forget_Q_A_Prob"]["value"]


def _one_error(rc, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_tokenizer_without_pad_token_scores_like_the_original(env, tiny_full_dir):
    nopad = _variant(env, "nopad", tiny_full_dir, edit_tokenizer=lambda t: setattr(t, "pad_token", None))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(nopad).pad_token_id is None  # really saved without one
    assert load_tokenizer(str(nopad)).pad_token_id == load_tokenizer(str(nopad)).eos_token_id  # pad := eos
    _, ref_out, _ = _eval(env, str(tiny_full_dir), "--template", env / "template.yaml")
    _, out, _ = _eval(env, str(nopad), "--template", env / "template.yaml")
    # with padding-only attention masks the pad id cannot change any number
    assert _value(out) == pytest.approx(_value(ref_out), rel=1e-6)


def test_no_chat_template_says_pass_template(env, tiny_full_dir):
    plain = _variant(env, "plain", tiny_full_dir)
    rc, _, err = _eval(env, str(plain), check=False)
    _one_error(rc, err, f"model '{plain}' has no chat template and no profile: pass --template FILE")


def test_chat_template_is_used_without_template_flag(env, tiny_full_dir):
    chat = _variant(env, "chat", tiny_full_dir, edit_tokenizer=lambda t: setattr(t, "chat_template", CHAT_TEMPLATE))
    _, with_flag, _ = _eval(env, str(tiny_full_dir), "--template", env / "template.yaml")
    _, out, _ = _eval(env, str(chat))
    assert _value(out) == pytest.approx(_value(with_flag), rel=1e-6)


def _family_messages(caplog):
    return [r.getMessage() for r in caplog.records if "differs from that of the task's reference" in r.getMessage()]


def test_other_vocabulary_works_and_is_not_compared_with_another_family(env, tiny_full_dir, tiny_retain99_dir,
                                                                       caplog):
    from harness.models.profiles import _FAMILY_CHECKED, finalize_template, resolve_model
    from harness.testing import char_tokenizer, tiny_llama

    other = env / "charmodel"
    if not other.exists():
        tok = char_tokenizer()
        tiny_llama(tok).save_pretrained(other)
        tok.save_pretrained(other)
    rc, out, _ = _eval(env, str(other), "--template", env / "template.yaml")
    assert 0.0 <= _value(out) <= 1.0

    _FAMILY_CHECKED.clear()
    task = plugins.get_registry().tasks["tofu_forget01"]
    tmpl = str(env / "template.yaml")
    same = _variant(env, "same_family", tiny_full_dir)
    choice = resolve_model(str(same), task, template_file=tmpl)
    assert choice.reference == "tiny:retain99"  # an outside checkpoint gets the task's own reference
    with caplog.at_level(logging.WARNING, logger="harness"):
        finalize_template(choice, load_tokenizer(str(same)))
    assert not _family_messages(caplog) and choice.reference == "tiny:retain99"
    # another vocabulary: the tiny retain model would be scored with a tokenizer it cannot read, so it is
    # dropped with a warning and forget quality asks for --reference (never a comparison across families)
    choice = resolve_model(str(other), task, template_file=tmpl)
    with caplog.at_level(logging.WARNING, logger="harness"):
        finalize_template(choice, load_tokenizer(str(other)))
    (msg,) = _family_messages(caplog)
    assert f"the tokenizer of {other} differs from that of the task's reference model tiny:retain99" in msg
    assert "pass --reference" in msg and choice.reference is None
    # an explicit --reference is the user's choice: no guessing, no check
    assert resolve_model(str(other), task, reference="logs/TOFU_EVAL.json").family is None


def test_log_reference_of_another_family_warns(env, tiny_full_dir, monkeypatch, caplog):
    """A default reference *log* is usable by any checkpoint, but its numbers come from the profile's family."""
    from harness.models import profiles
    from harness.testing import char_tokenizer, tiny_llama

    fam = profiles.Profile(name="fam", tokenizer=str(tiny_full_dir), tasks={"t7_ext": {
        "start": str(tiny_full_dir), "reference_log": "reference_logs/tofu_Llama-2-7b-chat-hf_retain99/TOFU_EVAL.json"}})
    monkeypatch.setattr(profiles, "get_profiles", lambda: {"fam": fam})
    profiles._FAMILY_CHECKED.clear()
    task = plugins.get_registry(include_tasks=[env / "tasks"]).tasks["t7_ext"]
    task = type(task)(**{**vars(task), "model": "fam"})
    other = env / "charmodel2"
    tok = char_tokenizer()
    tiny_llama(tok).save_pretrained(other)
    tok.save_pretrained(other)
    choice = profiles.resolve_model(str(other), task, template_file=str(env / "template.yaml"))
    assert choice.reference.endswith("tofu_Llama-2-7b-chat-hf_retain99/TOFU_EVAL.json")
    with caplog.at_level(logging.WARNING, logger="harness"):
        profiles.finalize_template(choice, load_tokenizer(str(other)))
    (msg,) = _family_messages(caplog)
    assert f"the tokenizer of {other} differs from that of the task's reference family ({tiny_full_dir}" in msg
    assert "forget quality and privleak compare against a different model family" in msg
    assert choice.reference.endswith("TOFU_EVAL.json")  # kept: a log needs no tokenizer


def _mismatched(env):
    """The tiny model's tokenizer (512 ids) next to weights with a 99-row embedding."""
    from harness.testing import char_tokenizer, tiny_llama

    d = env / "mismatch"
    if not d.exists():
        tiny_llama(char_tokenizer()).save_pretrained(d)
        from harness.models.tiny import tiny_model_dir

        load_tokenizer(str(tiny_model_dir("full"))).save_pretrained(d)
    return d


def test_tokenizer_larger_than_embedding_is_named(env, tiny_full_dir):
    d = _mismatched(env)
    with pytest.raises(HarnessError, match=r"the tokenizer has 512 token ids but the model's embedding has 99 rows"):
        check_checkpoint(load_model(str(d)), load_tokenizer(str(d)), str(d))
    check_checkpoint(load_model(str(tiny_full_dir)), load_tokenizer(str(tiny_full_dir)), "ok")


def _gpt2(env, tiny_full_dir, n_positions=16):
    """A GPT-2 (learned absolute position table ``wpe``) with the tiny tokenizer and a short context."""
    d = env / f"gpt2_ctx{n_positions}"
    if not d.exists():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = load_tokenizer(str(tiny_full_dir))
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
        tok.save_pretrained(d)
    return d


def test_rows_longer_than_the_context_are_listed_for_learned_positions(tiny_full_dir, env):
    short = _gpt2(env, tiny_full_dir)
    model = load_model(str(short))
    with pytest.raises(HarnessError) as exc:
        check_lengths(model, [10, 40, 16, 17, 12], str(short), what="task 't' data role 'forget'")
    assert str(exc.value) == (f"{short} has a context of 16 tokens but 2 row(s) of task 't' data role 'forget' are "
                              "longer (rows 1, 3; up to 40 tokens): pass --max-length 15 to truncate them (the "
                              "end-of-sequence token is appended after truncation; its learned position table "
                              "'transformer.wpe' has 16 rows)")
    check_lengths(model, [16, 3], str(short), what="x")


def test_rotary_rows_past_the_context_are_scored_and_said_once(tiny_full_dir, env, caplog):
    """A rotary model has no position table: longer rows are scored as the reference scores them (MUSE
    privleak rows are bos + 2048 tokens on 2048-context models), with one notice."""
    short = _variant(env, "short_ctx", tiny_full_dir, edit_config=lambda c: c.update(max_position_embeddings=16))
    model = load_model(str(short))
    with caplog.at_level(logging.WARNING, logger="harness"):
        for _ in range(2):
            check_lengths(model, [10, 40, 16, 17, 12], str(short), what="task 't' data role 'forget'")
    notes = [r.getMessage() for r in caplog.records if "beyond it" in r.getMessage()]
    assert notes == [f"{short} declares a context of 16 tokens; rows of up to 40 tokens (task 't' data role "
                     "'forget') use positions beyond it, as the reference does (it has no position table; "
                     "--max-length 15 truncates them instead)"]


def test_eval_on_mismatched_or_short_checkpoints_says_what_to_pass(env, tiny_full_dir, caplog, monkeypatch):
    rc, _, err = _eval(env, str(_mismatched(env)), "--template", env / "template.yaml", check=False)
    _one_error(rc, err, "512 token ids but the model's embedding has 99 rows")
    gpt2 = _gpt2(env, tiny_full_dir)
    rc, _, err = _eval(env, str(gpt2), "--template", env / "template.yaml", check=False)
    _one_error(rc, err, "has a context of 16 tokens", "pass --max-length 15", "'transformer.wpe'")
    rc, out, _ = _eval(env, str(gpt2), "--template", env / "template.yaml", "--max-length", "15")
    assert 0.0 <= _value(out) <= 1.0
    # the same weights declaring a 16-token context: a rotary model scores the long rows unchanged
    short = _variant(env, "short_ctx", tiny_full_dir, edit_config=lambda c: c.update(max_position_embeddings=16))
    from harness import hub

    monkeypatch.setattr(hub, "_noticed", set())
    with caplog.at_level(logging.WARNING, logger="harness"):
        _, out, _ = _eval(env, str(short), "--template", env / "template.yaml")
    assert sum("positions beyond it" in r.getMessage() for r in caplog.records) == 1
    _, full, _ = _eval(env, str(tiny_full_dir), "--template", env / "template.yaml")
    assert _value(out) == _value(full)
    _, cut, _ = _eval(env, str(short), "--template", env / "template.yaml", "--max-length", "15")
    assert _value(cut) != _value(full)


CUSTOM_CODE = """\
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class MyConfig(LlamaConfig):
    model_type = "my_llama"
class MyModel(LlamaForCausalLM):
    config_class = MyConfig
"""

def test_custom_code_runs_only_with_trust_remote_code(env, tiny_full_dir, tmp_path):
    marker = tmp_path / "marker.txt"

    def custom(cfg):
        cfg.update(model_type="my_llama", architectures=["MyModel"],
                   auto_map={"AutoConfig": "custom_llama.MyConfig", "AutoModelForCausalLM": "custom_llama.MyModel"})

    d = _variant(env, "custom", tiny_full_dir, edit_config=custom)
    (d / "custom_llama.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    rc, _, err = _eval(env, str(d), "--template", env / "template.yaml", check=False)
    _one_error(rc, err, f"{d} contains custom model code", "pass --trust-remote-code")
    assert not marker.exists()
    # asked for: the code runs (in a child process, so transformers' module cache goes to a temp dir)
    code = ("import sys; from harness.models.load import load_model, load_tokenizer; "
            "load_tokenizer(sys.argv[1], trust_remote_code=True); "
            "print(type(load_model(sys.argv[1], trust_remote_code=True)).__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert r.returncode == 0, textwrap.shorten(r.stderr, 3000)
    assert r.stdout.strip() == "MyModel"
    assert marker.read_text() == "custom code ran"
