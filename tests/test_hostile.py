"""Hostile input at the edges, one class per section, each test parametrized over several bad inputs:
YAML bombs/tags/duplicates, task field types, names that would climb out of the results tree, one bad
file in a task directory, plugins at fault. Operating-system errors and non-finite numbers in JSON:
tests/test_bad_input.py."""

import json
import textwrap
import time

import pytest
from conftest import cheap_task_yaml, run_cli

from harness import HarnessError, plugins
from harness.io import read_yaml

CHEAP = cheap_task_yaml("@NAME@", "cheap test task")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


def write(d, name, text):
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(textwrap.dedent(text).replace("@NAME@", name.split(".")[0]))
    return p


def error_line(rc, err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


# ------------------------------------------------------------------------------------------------ 1. YAML
BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi"))
assert len(BOMB) < 800

BAD_YAML = {
    "alias_bomb": (BOMB, ["line", "aliases expand to more than"]),
    "recursive_alias": ("task: x\na: &a [1, *a]\n", ["line 2", "recursive alias"]),
    "python_tag": ("task: x\nmodel: !!python/object/apply:os.getcwd []\n", ["line 2", "'!!python/object/apply:os.getcwd'"]),
    "custom_tag": ("task: x\nmodel: !foo bar\n", ["line 2", "tag '!foo' is not allowed"]),
    "set_tag": ("task: x\ntag: !!set {a: null}\n", ["line 2", "tag '!!set'"]),
    "duplicate_key": ("task: x\nmodel: a\nmodel: b\n", ["line 3", "duplicate key 'model'", "first at line 2"]),
    "duplicate_nested": ("task: x\ntraining:\n  lr: 1.0\n  epochs: 2\n  lr: 2.0\n", ["line 5", "duplicate key 'lr'"]),
}


def _read_task(p):
    from harness.tasks import parse_task

    return parse_task(p)


def _read_template(p):
    from harness.models.profiles import load_template_file

    return load_template_file(str(p))


def _read_registry(p, monkeypatch):
    monkeypatch.setattr(plugins, "builtin_root", lambda: p.parent)
    return plugins.read_registry_file()


@pytest.mark.parametrize("case", list(BAD_YAML))
@pytest.mark.parametrize("reader", ["read_yaml", "task", "template", "registry"])
def test_every_yaml_reader_refuses_bombs_tags_and_duplicates(tmp_path, monkeypatch, case, reader):
    text, needles = BAD_YAML[case]
    name = "registry.yaml" if reader == "registry" else f"{case}.yaml"
    p = write(tmp_path, name, text)
    call = {"read_yaml": read_yaml, "task": _read_task, "template": _read_template,
            "registry": lambda p: _read_registry(p, monkeypatch)}[reader]
    t0 = time.perf_counter()
    with pytest.raises(HarnessError) as exc:
        call(p)
    assert time.perf_counter() - t0 < 1.0
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{p}: line ") and "invalid YAML" in msg, msg
    for n in needles:
        assert n in msg, msg


def test_yaml_bomb_in_task_dir_fails_fast_on_the_command_line(tmp_path):
    d = tmp_path / "tasks"
    write(d, "bomb.yaml", BOMB)
    t0 = time.perf_counter()
    rc, _, err = run_cli("ls", "tasks", "--include-tasks", d, check=False)
    assert time.perf_counter() - t0 < 5
    assert "bomb.yaml: line" in error_line(rc, err)


def test_safe_yaml_still_reads_plain_data(tmp_path):
    p = write(tmp_path, "ok.yaml", "base: &b {x: 1}\nc:\n  <<: *b\n  y: [1, 2.5, true, null, '2']\n")
    assert read_yaml(p) == {"base": {"x": 1}, "c": {"x": 1, "y": [1, 2.5, True, None, "2"]}}


# ------------------------------------------------------------------------------------- 2. task field types
FIELD_CASES = [
    ("metrics: forget_Q_A_Prob", "field 'metrics' must be a list"),
    ("metrics: {forget_Q_A_Prob: 1}", "field 'metrics' must be a list"),
    ("tag: 5", "field 'tag' must be a string or a list of strings"),
    ("tag: [tofu, 3]", "field 'tag' must be a string or a list of strings"),
    ("version: two", "field 'version' must be an integer, got 'two'"),
    ("version: 1.5", "field 'version' must be an integer, got 1.5"),
    ("description: [a, b]", "field 'description' must be a string"),
    ("prompt: {question: 3}", "prompt.question must be a string"),
    ("training: [1, 2]", "field 'training' must be a mapping"),
    ("training: {lr: 1e-5}", "training.lr must be a number, got the string '1e-5' (YAML reads 1e-5 as text"),
    ("training: {lr: -1.0}", "training.lr must be positive, got -1.0"),
    ("training: {lr: .inf}", "training.lr must be a finite number, got inf"),
    ("training: {lr: true}", "training.lr must be a number, got True"),
    ("training: {epochs: 2.5}", "training.epochs must be a whole number, got 2.5"),
    ("training: {epochs: 0}", "training.epochs must be positive, got 0"),
    ("training: {batch_size: 2.5}", "training.batch_size must be a whole number"),
    ("training: {per_device_batch: '4'}", "training.per_device_batch must be a number, got the string '4'"),
    ("training: {max_length: -5}", "training.max_length must be positive, got -5"),
    ("training: {warmup_epochs: -1}", "training.warmup_epochs must not be negative, got -1"),
    ("training: {weight_decay: -0.1}", "training.weight_decay must not be negative"),
    ("training: {schedule: 3}", "training.schedule must be a name (string), got 3"),
    ("training: {optimizer: [adamw_torch]}", "training.optimizer must be a name (string)"),
    ("training: {gradient_checkpointing: 'yes'}", "training.gradient_checkpointing must be true or false, got 'yes'"),
]


def _task_with(tmp_path, line):
    keys = {ln.split(":", 1)[0] for ln in line.splitlines()}
    # replace the task's own line of that key (a second one would be a duplicate-key error)
    base = "".join(ln for ln in CHEAP.replace("@NAME@", "typed").splitlines(True) if ln.split(":", 1)[0] not in keys)
    return write(tmp_path / "tasks", "typed.yaml", base + line + "\n")


@pytest.mark.parametrize("line, needle", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_task_field_types_are_checked_naming_file_and_field(tmp_path, line, needle):
    from harness.tasks import parse_task

    p = _task_with(tmp_path, line)
    with pytest.raises(HarnessError) as exc:
        parse_task(p)
    assert str(p) in str(exc.value) and needle in str(exc.value), str(exc.value)


def test_task_field_type_error_on_the_command_line(tmp_path):
    p = _task_with(tmp_path, "training: {epochs: 2.5}")
    rc, _, err = run_cli("run", "-t", "typed", "-m", "npo", "--dry-run", "--include-tasks", p.parent,
                         "-o", tmp_path / "res", check=False)
    line = error_line(rc, err)
    assert "typed.yaml" in line and "training.epochs must be a whole number" in line


def test_whole_float_epochs_and_good_types_are_accepted(tmp_path):
    from harness.tasks import parse_task

    t = parse_task(_task_with(tmp_path, "training: {epochs: 2.0, lr: 1.0e-4, gradient_checkpointing: true}\n"
                                        "tag: [tofu, mine]\nversion: 3"))
    assert t.training["epochs"] == 2 and t.version == 3 and t.tag == ["tofu", "mine"]


# ---------------------------------------------------------------------------------------- 3. containment
UNSAFE = ["../escape", "a/b", "..", ".hidden", "/abs", "a\\b", "x y"]


@pytest.mark.parametrize("name", UNSAFE)
def test_task_name_cannot_leave_the_results_tree(tmp_path, name):
    d = tmp_path / "tasks"
    write(d, "evil.yaml", CHEAP.replace("task: @NAME@", f"task: {json.dumps(name)}"))
    rc, _, err = run_cli("run", "-t", "*", "-m", "npo", "--dry-run", "--include-tasks", d,
                         "-o", tmp_path / "res", check=False)
    line = error_line(rc, err)
    assert "evil.yaml: field 'task'" in line and "not a safe name" in line, line


@pytest.mark.parametrize("name", UNSAFE)
def test_eval_name_cannot_leave_the_results_tree(tmp_path, name):
    out = tmp_path / "res"
    rc, _, err = run_cli("eval", "-t", "tofu_forget01", "--model", "tiny:full", "--limit", "1", "--name", name,
                         "-o", out, check=False)
    assert error_line(rc, err).startswith(f"error: --name: {name!r} is not a safe name")
    assert not out.exists()


@pytest.mark.parametrize("name", UNSAFE)
def test_plugin_method_name_cannot_leave_the_results_tree(tmp_path, name, monkeypatch):
    write(tmp_path / "plugs", "evilname.py", f"""
        import dataclasses
        from typing import ClassVar
        from harness import hookimpl
        from harness.methods import Method

        @dataclasses.dataclass
        class Evil(Method):
            name: ClassVar[str] = {name!r}
            def loss(self, model, batch, ref):
                raise AssertionError("never trained")

        @hookimpl
        def register_methods(register):
            register(Evil)
        """)
    rc, _, err = run_cli("ls", "methods", "--plugins-dir", tmp_path / "plugs", check=False)
    line = error_line(rc, err)
    assert "plugin 'plugs/evilname.py' failed" in line and "not a safe name" in line


@pytest.mark.parametrize("label", ["../up", "a/b", ".."])
def test_run_dir_refuses_unsafe_components(tmp_path, label):
    from harness.results.rundir import run_dir

    for args in ((label, "t", "m"), ("m", label, "m"), ("m", "t", label)):
        with pytest.raises(HarnessError, match="is not a safe name"):
            run_dir(tmp_path, *args, {"x": 1}, 0)


@pytest.mark.parametrize("model", ["org/../../x", "../..", "/", ".hidden_dir"])
def test_model_labels_are_one_safe_component(tmp_path, monkeypatch, model):
    from harness.models.profiles import _label_for
    from harness.paths import safe_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".hidden_dir").mkdir()
    assert safe_name(_label_for(model), "label")


# ------------------------------------------------------------------------ 4. one bad file in a task directory
BROKEN_FILES = {
    "syntax": "task: broken\nmetrics: [forget_Q_A_Prob\n",
    "field_type": CHEAP.replace("@NAME@", "broken") + "training: {epochs: 2.5}\n",
    "unsafe_name": CHEAP.replace("task: @NAME@", "task: ../broken"),
    "alias_bomb": BOMB,
}


@pytest.mark.parametrize("kind", list(BROKEN_FILES))
def test_one_bad_task_file_hides_only_itself(tmp_path, monkeypatch, kind, caplog):
    d = tmp_path / "tasks"
    write(d, "good_task.yaml", CHEAP)
    bad = write(d, "broken.yaml", BROKEN_FILES[kind])
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")
    rc, out, _ = run_cli("ls", "tasks", "--include-tasks", d)
    assert "good_task" in out and "tofu_forget01" in out
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    rc, out, _ = run_cli("run", "-t", "good_task", "-m", "npo", "--model", "tiny:full", "--dry-run",
                         "--include-tasks", d, "-o", tmp_path / "res")
    assert out.startswith("1 run(s):")
    # selecting what that file would have been names the file
    rc, _, err = run_cli("run", "-t", "broken", "-m", "npo", "--dry-run", "--include-tasks", d,
                         "-o", tmp_path / "res", check=False)
    assert f"task files that failed to load: {bad}" in error_line(rc, err)
    # strict (the test default) and `harness validate`: an error naming the file
    for env, argv in (("1", ["ls", "tasks"]), ("0", ["validate"])):
        monkeypatch.setenv("HARNESS_STRICT_PLUGINS", env)
        plugins._CACHE.clear()
        rc, _, err = run_cli(*argv, "--include-tasks", d, check=False)
        assert str(bad) in error_line(rc, err)


def test_missing_include_tasks_dir_is_an_error(tmp_path):
    rc, _, err = run_cli("ls", "tasks", "--include-tasks", tmp_path / "nope", check=False)
    assert "--include-tasks" in error_line(rc, err) and "nope" in err


# ------------------------------------------------------------------------------------ 5. plugins at fault
PLUGIN_HEAD = """
import dataclasses
from typing import ClassVar
from harness import hookimpl
from harness.methods import Method
from harness.metrics import Score, metric

@dataclasses.dataclass
class Fine(Method):
    name: ClassVar[str] = "fine_method"
    def loss(self, model, batch, ref):
        return model(**{k: batch["forget"][k] for k in ("input_ids", "attention_mask")}).logits.mean()

class NotData(Method):
    name: ClassVar[str] = "notdata"
    beta: float = 0.5
"""

BAD_REGISTRATIONS = {
    "method_instance": ("register_methods", "Fine()", "not a subclass of harness.methods.Method"),
    "method_not_dataclass": ("register_methods", "NotData", "NotData, which is not a @dataclass (hyper-parameters beta would be ignored)"),
    "method_function": ("register_methods", "print", "not a subclass of harness.methods.Method"),
    "method_string": ("register_methods", "'npo'", "registered 'npo', not a subclass"),
    "metric_function": ("register_metrics", "lambda ctx: Score(1.0)", "not a harness.metrics.Metric"),
    "metric_class": ("register_metrics", "Fine", "not a harness.metrics.Metric"),
    "task_missing_path": ("register_tasks", "'/no/such/tasks'", "registered /no/such/tasks, which does not exist"),
    "task_not_a_path": ("register_tasks", "42", "registered 42, not a path"),
}


@pytest.mark.parametrize("case", list(BAD_REGISTRATIONS))
def test_plugin_registering_the_wrong_thing_is_that_plugins_failure(tmp_path, monkeypatch, case, caplog):
    hook, item, needle = BAD_REGISTRATIONS[case]
    d = tmp_path / "plugs"
    write(d, f"wrong_{case}.py", PLUGIN_HEAD + f"\n@hookimpl\ndef {hook}(register):\n    register({item})\n")
    rc, _, err = run_cli("ls", "--plugins-dir", d, check=False)  # strict (test default)
    line = error_line(rc, err)
    plugin = f"plugs/wrong_{case}.py"  # one file name per case: plugin modules are cached by name
    assert f"plugin '{plugin}' failed" in line and needle in line, line
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")
    plugins._CACHE.clear()
    rc, out, _ = run_cli("ls", "plugins", "--plugins-dir", d)
    assert plugin in out and "failed" in out and needle in out
    assert any(plugin in r.getMessage() and needle in r.getMessage() for r in caplog.records)
    rc, out, _ = run_cli("ls", "methods", "--plugins-dir", d)
    assert "npo" in out
    rc, _, err = run_cli("validate", "--plugins-dir", d, check=False)
    assert needle in error_line(rc, err)


BAD_LOSSES = {
    "float": ("return 0.5", "loss() returned float 0.5, expected a scalar torch.Tensor"),
    "dict": ("return {'loss': 1}", "loss() returned dict"),
    "vector": ("return model(**fwd).logits.mean(-1).flatten()", "loss() returned a tensor of shape"),
    "long": ("return torch.tensor(3)", "loss() returned a torch.int64 tensor"),
    "detached": ("return model(**fwd).logits.mean().detach()", "does not require grad"),
    "triple": ("return (model(**fwd).logits.mean(), {}, 1)", "returned a tuple of 3 item(s)"),
}


@pytest.mark.parametrize("case", list(BAD_LOSSES))
def test_method_loss_that_is_not_a_scalar_is_named(tmp_path, case):
    from harness.testing import one_step

    body, needle = BAD_LOSSES[case]
    d = tmp_path / "plugs"
    write(d, f"badloss_{case}.py", f"""
import dataclasses
from typing import ClassVar
import torch
from harness import hookimpl
from harness.methods import Method

@dataclasses.dataclass
class BadLoss(Method):
    name: ClassVar[str] = "badloss"
    def loss(self, model, batch, ref):
        fwd = {{k: batch["forget"][k] for k in ("input_ids", "attention_mask")}}
        {body}

@hookimpl
def register_methods(register):
    register(BadLoss)
""")
    reg = plugins.build_registry(plugins_dirs=[d], strict=True)
    method = plugins.guard_method(reg.methods["badloss"](), "badloss", reg.sources[("methods", "badloss")])
    with pytest.raises(HarnessError) as exc:
        one_step(method)
    msg = str(exc.value)
    assert msg.startswith(f"method 'badloss' from plugin 'plugs/badloss_{case}.py': ") and needle in msg and "\n" not in msg


METRIC_PLUGIN = """
from harness import hookimpl
from harness.metrics import Score, metric

MINE = []

@metric("mine_rows", better="higher", into=MINE)
def mine_rows(ctx):
    return Score(float(len(ctx.rows("forget"))))

@metric("mine_boom", into=MINE)
def mine_boom(ctx):
    {boom}

@hookimpl
def register_metrics(register):
    for m in MINE:
        register(m.metric if hasattr(m, "metric") else m)
"""


def _metric_plugin(tmp_path, boom="raise ValueError('bad arithmetic in the plugin')", stem="mymetrics"):
    d = tmp_path / "plugs"
    write(d, f"{stem}.py", METRIC_PLUGIN.replace("{boom}", boom))
    return d


def test_plugins_dir_metric_is_known_in_every_phase_of_run(tmp_path):
    plugs = _metric_plugin(tmp_path)
    tasks = tmp_path / "tasks"
    write(tasks, "t_mine.yaml", CHEAP.replace("[forget_Q_A_Prob]", "[forget_Q_A_Prob, mine_rows]"))
    out = tmp_path / "res"
    run_cli("run", "-t", "t_mine", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", tasks,
            "--plugins-dir", plugs, "-o", out, "--limit", "2", "--epochs", "1", "--train-batch-size", "2",
            "--per-device-batch", "2")
    found = {p.parts[-3]: json.loads(p.read_text()) for p in out.rglob("scores.json")}
    assert set(found) == {"finetuned", "grad_ascent"}, found  # the baseline, then the unlearned model
    for doc in found.values():
        assert doc["metrics"]["mine_rows"]["value"] == 2.0


@pytest.mark.parametrize("n, boom, needle", [
    (0, "raise ValueError('bad arithmetic in the plugin')", "failed: ValueError: bad arithmetic in the plugin"),
    (1, "return 1 / 0", "failed: ZeroDivisionError: division by zero"),
    (2, "return {}['missing']", "failed: KeyError: 'missing'"),
    (3, "return 0.5", "returned float, expected harness.metrics.Score"),
])
def test_metric_that_raises_is_named_with_its_plugin(tmp_path, tiny_full_dir, n, boom, needle):
    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import TINY_TEMPLATE
    from harness.scoring.evaluate import evaluate_task

    reg = plugins.build_registry(plugins_dirs=[_metric_plugin(tmp_path, boom, f"boom{n}")], strict=True)
    model, tok = load_model(str(tiny_full_dir)), load_tokenizer(str(tiny_full_dir))
    with pytest.raises(HarnessError) as exc:
        evaluate_task(reg.tasks["tofu_forget01"], model, tok, TINY_TEMPLATE, limit=2, registry=reg,
                      metrics=["mine_boom"], progress=False)
    msg = str(exc.value)
    assert f"metric 'mine_boom' from plugin 'plugs/boom{n}.py'" in msg and needle in msg and "\n" not in msg
