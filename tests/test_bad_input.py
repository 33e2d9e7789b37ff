"""Bad input gives one clear error line (file, field or plugin named), a non-zero exit, no traceback unless
--debug, and leaves finished results alone. Also: YAML only through safe loaders, no eval/exec of config."""

import errno
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, cheap_task_yaml, run_cli

from harness import HarnessError, plugins
from harness.io import write_json

# task_dir fills @NAME@ with the file stem
CHEAP_TASK = cheap_task_yaml("@NAME@", "forget01 with one cheap metric (no generation, no reference), for tests")


def task_dir(tmp_path, files: dict) -> str:
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(textwrap.dedent(text).replace("@NAME@", name.split(".")[0]))
    return str(d)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


def one_error(rc, err, *needles):
    """Exactly one `error:` line, no traceback, non-zero exit; returns the line."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc != 0, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def finished(tmp_path):
    """A finished result from earlier, which no failing command may touch."""
    d = tmp_path / "res" / "tiny_full" / "tofu_forget01" / "npo" / "0123abcd-s0"
    d.mkdir(parents=True)
    (d / "scores.json").write_text(json.dumps({"task": "tofu_forget01", "metrics": {"x": {"value": 0.5}}}))
    (d / "config.yaml").write_text("seed: 0\n")
    before = {p: p.read_bytes() for p in d.iterdir()}
    yield tmp_path / "res"
    assert {p: p.read_bytes() for p in d.iterdir()} == before


# ------------------------------------------------------------------------------------------- task YAML
@pytest.mark.parametrize("text, needles", [
    ("task: broken\nmetrics: [forget_Q_A_Prob\n", ["broken.yaml: line", "invalid YAML"]),
    ("task: broken\nmetric: [forget_Q_A_Prob]\ndata: {forget: {path: x}}\n",
     ["broken.yaml: unknown key 'metric'", "did you mean 'metrics'"]),
    ("task: broken\ninclude: broken.yaml\nmetrics: [a]\ndata: {forget: {path: x}}\n", ["broken.yaml", "include cycle"]),
    ("task: broken\nmetrics: [a]\ndata: {forget: {path: locuslab/TOFU, splt: train}}\n",
     ["broken.yaml: data.forget: unknown key 'splt'", "did you mean 'split'"]),
    ("task: broken\nmetrics: [a]\ndata: {forget: {path: x}}\ntraining: {learning_rate: 1.0}\n",
     ["broken.yaml: training: unknown key 'learning_rate'"]),
    ("- just\n- a list\n", ["broken.yaml: a task file must be a mapping"]),
    ("task: !!python/object/apply:os.system ['echo pwned']\n", ["broken.yaml", "invalid YAML"]),
])
def test_bad_task_yaml_is_one_error_naming_the_file(tmp_path, finished, text, needles):
    d = task_dir(tmp_path, {"broken.yaml": text})
    for argv in (["ls", "tasks"], ["run", "-t", "tofu_forget01", "-m", "npo", "-o", finished, "--dry-run"]):
        rc, _, err = run_cli(*argv, "--include-tasks", d, check=False)
        one_error(rc, err, *needles)


def test_bad_task_yaml_is_never_a_silent_skip_when_plugins_are_lenient(tmp_path, monkeypatch):
    # lenient: the folder's other tasks stay usable, but selecting the broken one names its file
    # (never a bare "task not found"); tests/test_hostile.py covers the class
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")
    d = task_dir(tmp_path, {"broken.yaml": "task: [unclosed\n"})
    rc, out, _ = run_cli("ls", "tasks", "--include-tasks", d)
    assert "tofu_forget01" in out
    rc, _, err = run_cli("run", "-t", "broken", "-m", "npo", "--dry-run", "--include-tasks", d, check=False)
    one_error(rc, err, "unknown task 'broken'", "task files that failed to load:", "broken.yaml: line 2 invalid YAML")


# ---------------------------------------------------------------------------------- data problems
def test_unknown_data_field_before_any_model_work(tmp_path, finished):
    d = task_dir(tmp_path, {"t7_field.yaml": CHEAP_TASK + "prompt: {question: query, answer: answer}\n"})
    rc, _, err = run_cli("run", "-t", "t7_field", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", d,
                         "-o", finished, check=False)
    one_error(rc, err, "t7_field.yaml", "data role 'forget' row 0 has no field 'query'", "fields: question, answer")
    assert not (finished / "tiny_full" / "t7_field").exists()  # failed before creating any run directory


@pytest.mark.parametrize("text, needle", [
    ("", "task 'tofu_forget01': data role 'forget' (locuslab/TOFU/forget01:train) is empty"),
    ('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n', "forget01.jsonl:2: invalid JSON line"),
], ids=["empty_forget_split", "malformed_line_names_file_and_line"])
def test_bad_forget_data_file(tmp_path, finished, text, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget01.jsonl").write_text(text)
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "grad_ascent", "--data-dir", data, "-o", finished,
                         check=False)
    one_error(rc, err, needle)


# ------------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("extra, needles", [
    (["--set", "npo.beta=inf"], ["method 'npo': hyper-parameter 'beta' must be finite, got inf"]),
    (["--set", "npo.alpha=nan"], ["method 'npo': hyper-parameter 'alpha' must be finite, got nan"]),
    (["--set", "npo.beta=big"], ["method 'npo': cannot parse beta='big' as float"]),
    (["--lr", "nan"], ["training.lr must be a finite number, got nan (from --lr)"]),
    (["--epochs", "inf"], ["training.epochs must be a finite number, got inf (from --epochs)"]),
    (["--set", "npo.betaa=0.2"], ["method 'npo' has no hyper-parameter 'betaa'", "valid: alpha, beta, gamma"]),
    (["--set", "grad_diff.alpha=1"], ["--set 'grad_diff.alpha=1': method 'grad_diff' is not selected"]),
    (["--set", "npo_beta=1"], ["expected METHOD.FIELD=VALUE"]),
])
def test_bad_hyper_parameters(finished, extra, needles):
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "-o", finished, *extra, check=False)
    one_error(rc, err, *needles)


def test_non_finite_value_in_task_file_names_the_file(tmp_path, finished):
    # warmup_epochs: a key the tiny profile does not override (its lr would replace the task's)
    d = task_dir(tmp_path, {"t7_nan.yaml": CHEAP_TASK + "training: {warmup_epochs: .nan}\n"})
    rc, _, err = run_cli("run", "-t", "t7_nan", "-m", "npo", "--model", "tiny:full", "--include-tasks", d,
                         "-o", finished, "--dry-run", check=False)
    one_error(rc, err, "training.warmup_epochs must be a finite number, got nan", "t7_nan.yaml")


# --------------------------------------------------------------------------------------- plugins
BOOM_REGISTER = """
from harness import hookimpl

@hookimpl
def register_methods(register):
    raise RuntimeError("kaput while registering")
"""

BOOM_LOSS = """
import dataclasses
from typing import ClassVar
from harness import hookimpl
from harness.methods import Method

@dataclasses.dataclass
class Boom(Method):
    name: ClassVar[str] = "boom"
    def loss(self, model, batch, ref):
        return {}["no such key in the plugin"]

@hookimpl
def register_methods(register):
    register(Boom)
"""


def test_plugin_raising_during_registration(tmp_path, finished, monkeypatch):
    d = tmp_path / "plugs"
    d.mkdir()
    (d / "boom.py").write_text(BOOM_REGISTER)
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--dry-run", "-o", finished, "--plugins-dir", d,
                         check=False)
    one_error(rc, err, "plugin 'plugs/boom.py' failed: RuntimeError: kaput while registering")
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")  # users: the rest of the harness keeps working
    plugins._CACHE.clear()
    rc, out, _ = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--dry-run", "-o", finished, "--plugins-dir", d)
    assert rc == 0 and out.startswith("1 run(s):")


def test_plugin_raising_in_loss_is_named(tmp_path):
    """The runner wraps a method's loss(): the error names the method and the plugin that registered it."""
    from harness.testing import one_step

    d = tmp_path / "plugs"
    d.mkdir()
    (d / "boomloss.py").write_text(BOOM_LOSS)
    reg = plugins.build_registry(plugins_dirs=[d], strict=True)
    assert reg.sources[("methods", "boom")] == "plugs/boomloss.py"
    method = plugins.guard_method(reg.methods["boom"](), "boom", reg.sources[("methods", "boom")])
    with pytest.raises(HarnessError) as exc:
        one_step(method)
    assert str(exc.value) == "method 'boom' from plugin 'plugs/boomloss.py' failed: KeyError: 'no such key in the plugin'"


def test_plugin_raising_in_loss_keeps_finished_cells(tmp_path):
    d = tmp_path / "plugs"
    d.mkdir()
    (d / "boomloss.py").write_text(BOOM_LOSS)
    tasks = task_dir(tmp_path, {"t7_cheap.yaml": CHEAP_TASK})
    out = tmp_path / "res"
    common = ["-t", "t7_cheap", "--model", "tiny:full", "--include-tasks", tasks, "--plugins-dir", d, "-o", out,
              "--limit", "2", "--epochs", "1", "--batch-size", "2", "--per-device-batch", "2"]
    rc, _, err = run_cli("run", "-m", "grad_ascent,boom", *common, check=False)
    one_error(rc, err, "method 'boom' from plugin 'plugs/boomloss.py' failed: KeyError")
    done = list((out / "tiny_full" / "t7_cheap" / "grad_ascent").glob("*/scores.json"))
    assert len(done) == 1
    assert not list((out / "tiny_full" / "t7_cheap" / "boom").glob("*/scores.json"))


# ----------------------------------------------------------------------------------- references
def test_reference_log_without_needed_keys(tmp_path, tiny_full_dir, finished):
    log = tmp_path / "TOFU_EVAL.json"
    log.write_text(json.dumps({"mia_min_k": {"agg_value": 0.5}}))
    d = task_dir(tmp_path, {"t7_fq.yaml": CHEAP_TASK.replace("[forget_Q_A_Prob]", "[forget_quality]")})
    rc, _, err = run_cli("eval", "-t", "t7_fq", "--model", "tiny:full", "--reference", log, "--include-tasks", d,
                         "--limit", "2", "-o", finished, check=False)
    one_error(rc, err, str(log), "no 'forget_truth_ratio' entry")
    assert not list(finished.rglob("t7_fq/**/scores.json"))


def test_corrupt_cached_model(tmp_path, tiny_full_dir, monkeypatch, finished):
    import shutil

    from harness.models.tiny import root

    home = tmp_path / "home"
    src = root()
    dst = home / src.relative_to(src.parents[1])
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    weights = dst / "full" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setenv("HARNESS_HOME", str(home))
    d = task_dir(tmp_path, {"t7_cheap.yaml": CHEAP_TASK})
    rc, _, err = run_cli("eval", "-t", "t7_cheap", "--model", "tiny:full", "--include-tasks", d, "--limit", "2",
                         "-o", finished, check=False)
    one_error(rc, err, f"the cached model {dst / 'full'} is corrupt", "delete that directory and rerun")


# ------------------------------------------------------------------------------ process-level view
def test_one_line_and_exit_code_in_a_real_process_traceback_with_debug(tmp_path):
    cmd = [sys.executable, "-m", "harness", "run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.beta=inf",
           "--dry-run", "-o", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr == "error: method 'npo': hyper-parameter 'beta' must be finite, got inf\n"
    with pytest.raises(HarnessError, match="must be finite"):  # --debug: the exception and its traceback
        run_cli(*cmd[3:], "--debug", check=False)


def test_unexpected_exception_is_one_line_without_debug(monkeypatch, tmp_path):
    def explode(args):
        raise ZeroDivisionError("division by zero somewhere deep")

    monkeypatch.setattr("harness.commands.run.main", explode)
    rc, _, err = run_cli("run", "-t", "x", "-m", "y", check=False)
    assert rc == 1
    assert err == ("error: unexpected ZeroDivisionError: division by zero somewhere deep "
                   "(rerun with --debug for the traceback)\n")
    with pytest.raises(ZeroDivisionError):
        run_cli("run", "-t", "x", "-m", "y", "--debug", check=False)


# -------------------------------------------------------------------------------------- security
CODE_DIRS = ["harness", "methods", "examples", "scripts"]


def _sources():
    for d in CODE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            yield p, p.read_text(encoding="utf-8")


def test_yaml_only_through_safe_loaders_and_no_eval_exec():
    bad = []
    for p, text in _sources():
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\(", code) or "yaml.Loader" in code \
                    or "UnsafeLoader" in code or "FullLoader" in code:
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"(?<![\w.])(eval|exec|compile)\s*\(", code) or "__import__(" in code:
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\s*\(|torch\.load\s*\((?![^)]*weights_only\s*=\s*True)", code):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "unsafe loading or evaluation of text:\n" + "\n".join(bad)


def test_trust_remote_code_is_off_unless_asked():
    from harness.cli import parse_options
    from harness.models.load import load_model, load_tokenizer

    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    for verb in (["eval", "-t", "x"], ["run", "-t", "x", "-m", "y"], ["finetune", "--model", "m", "-o", "o"]):
        assert parse_options(verb).trust_remote_code is False
        assert parse_options([*verb, "--trust-remote-code"]).trust_remote_code is True
    for p, text in _sources():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), p


# Operating-system errors and strict JSON, one class per section (the input classes: tests/test_hostile.py)
def error_line(rc, err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------- 6. operating system
def _results(tmp_path):
    """A tiny finished results tree (what `harness report` reads)."""
    d = tmp_path / "res" / "tiny_full" / "tofu_forget01" / "npo" / "0123abcd-s0"
    d.mkdir(parents=True)
    (d / "scores.json").write_text(json.dumps({"task": "tofu_forget01", "model": "tiny_full", "method": "npo",
                                               "metrics": {"forget_Q_A_Prob": {"value": 0.5}}}))
    return tmp_path / "res"


IN_THE_WAY = "a file is in the way where a directory is expected"


def _file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


@pytest.mark.parametrize("argv", [
    lambda res, f: ["report", res, "-o", f / "report.md"],
    lambda res, f: ["report", res, "--format", "json", "-o", f / "sub" / "report.json"],
    lambda res, f: ["report", res, "--plot", f / "plot.png"],
    lambda res, f: ["eval", "-t", "tofu_forget01", "--model", "tiny:full", "--limit", "1", "-o", f],
], ids=["report_o", "report_json_nested", "plot", "eval_o"])
def test_file_where_a_directory_is_expected(tmp_path, argv):
    res, f = _results(tmp_path), _file(tmp_path)
    rc, _, err = run_cli(*argv(res, f), check=False)
    line = error_line(rc, err)  # "cannot write" where the harness writes; a raw mkdir elsewhere says less
    assert line in (f"error: cannot write {f}: {IN_THE_WAY}", f"error: {f}: {IN_THE_WAY}"), line


def test_harness_home_is_a_file(tmp_path, monkeypatch):
    f = _file(tmp_path)
    monkeypatch.setenv("HARNESS_HOME", str(f / "home"))
    rc, _, err = run_cli("eval", "-t", "tofu_forget01", "--model", "tiny:full", "--limit", "1",
                         "-o", tmp_path / "out", check=False)
    assert error_line(rc, err) == f"error: $HARNESS_HOME: cannot write {f}: a file is in the way where a directory is expected"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod does not stop root from writing (the "
                    "file-in-the-way cases above cover the same error path)")
@pytest.mark.parametrize("flag", ["-o", "--plot"])
def test_read_only_directory(tmp_path, flag):
    res = _results(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run_cli("report", res, flag, ro / "x.png", check=False)
        assert error_line(rc, err).startswith(f"error: cannot write {ro / 'x.png'}: permission denied")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EROFS, "read-only file system")])
def test_disk_full_keeps_the_old_file_and_says_so(tmp_path, monkeypatch, code, words):
    res = _results(tmp_path)
    out = tmp_path / "report.md"
    out.write_text("earlier report\n")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("harness.io.os.fsync", full)
    rc, _, err = run_cli("report", res, "-o", out, check=False)
    assert error_line(rc, err) == f"error: cannot write {out}: {words}"
    assert out.read_text() == "earlier report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "res"]  # no temp file left behind


@pytest.mark.parametrize("shell", [False, True], ids=["closed_pipe", "head"])
def test_closed_stdout_pipe_is_a_quiet_exit(shell):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if shell:
        r = subprocess.run(f"'{sys.executable}' -m harness ls | head -1", shell=True, capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.stdout.count("\n") == 1
    else:
        rd, wr = os.pipe()
        os.close(rd)  # nobody will read: the first flush hits EPIPE
        try:
            r = subprocess.run([sys.executable, "-m", "harness", "ls"], stdout=wr, stderr=subprocess.PIPE,
                               text=True, timeout=120, env=env)
        finally:
            os.close(wr)
        assert r.returncode == 141
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr and "error" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ 7. strict JSON
def _nonfinite(kind):
    import numpy as np
    import torch

    return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "np_nan": np.float64("nan"),
            "torch_inf": torch.tensor(float("inf"))}[kind]


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "np_nan", "torch_inf"])
def test_non_finite_metric_values_become_null_with_a_reason(tmp_path, kind):
    from harness.metrics import Score
    from harness.report.load import load_runs
    from harness.scoring.export import write_outputs

    reg = plugins.build_registry(strict=True)
    task = reg.tasks["tofu_forget01"]
    bad = _nonfinite(kind)
    scores = {"forget_Q_A_Prob": Score(bad, per_sample={0: {"prob": bad}, 1: {"prob": 0.25}}),
              "forget_truth_ratio": Score(0.5, per_sample={0: {"score": bad}}),
              "privleak": Score(bad, extra={"forget": {"agg_value": bad, "value_by_index": {0: {"score": bad}}}})}
    out = tmp_path / "res" / "tiny_full" / "tofu_forget01" / "npo" / "0123abcd-s0"
    write_outputs(out, task, scores, reg, ["forget_Q_A_Prob", "forget_truth_ratio", "privleak"],
                  model_label="tiny_full", partial=False, settings={}, identity={"method": "npo", "seed": 0})
    doc = strict_json((out / "scores.json").read_text())
    expect = {"nan": "nan", "np_nan": "nan", "inf": "inf", "torch_inf": "inf", "-inf": "-inf"}[kind]
    m = doc["metrics"]["forget_Q_A_Prob"]
    assert m["value"] is None and m["reason"].startswith(f"{expect}: ")
    assert doc["metrics"]["forget_truth_ratio"]["value"] == 0.5 and "reason" not in doc["metrics"]["forget_truth_ratio"]
    ev = strict_json((out / "TOFU_EVAL.json").read_text())
    assert ev["forget_Q_A_Prob"]["agg_value"] is None
    assert ev["forget_Q_A_Prob"]["value_by_index"] == {"0": {"prob": None}, "1": {"prob": 0.25}}
    assert ev["privleak"]["forget"]["value_by_index"]["0"]["score"] is None
    assert strict_json((out / "TOFU_SUMMARY.json").read_text()) == {
        "forget_Q_A_Prob": None, "forget_truth_ratio": 0.5, "privleak": None}
    for line in (out / "samples.jsonl").read_text().splitlines():
        strict_json(line)
    run = load_runs(tmp_path / "res")[0]  # the report reads null as n/a
    assert run.values["forget_Q_A_Prob"] is None and run.values["forget_truth_ratio"] == 0.5


@pytest.mark.parametrize("value", [float("nan"), [1.0, float("inf")], {"a": {"b": float("-inf")}}])
def test_write_json_refuses_bare_nan(tmp_path, value):
    p = tmp_path / "x.json"
    with pytest.raises(HarnessError, match="non-finite"):
        write_json(p, value)
    assert not p.exists() and not list(tmp_path.iterdir())
