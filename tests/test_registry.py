"""Plugin registry, task YAML schema, CLI listing and the dry-run grid."""

import dataclasses
import os
import re
import textwrap
from typing import ClassVar

import pytest
from conftest import run_cli

from harness import HarnessError, hookimpl
from harness.methods import Method, build_method
from harness.plugins import build_registry
from harness.tasks import parse_task

BUILTIN_METHODS = {"grad_ascent", "grad_diff", "idk_dpo", "npo", "simnpo", "rmu", "undial", "pdu"}
TASKS = {"tofu_forget01", "tofu_forget05", "tofu_forget10", "muse_news", "muse_books", "wmdp_bio", "wmdp_cyber"}


def test_builtins_register_through_hooks():
    reg = build_registry(strict=True)
    assert TASKS <= set(reg.tasks)
    assert BUILTIN_METHODS <= set(reg.methods)
    assert {"forget_quality", "model_utility", "lm_eval"} <= set(reg.metrics)
    assert reg.failures == []
    assert reg.sources[("methods", "npo")] == "builtin:methods/npo.py"


@dataclasses.dataclass
class Shout(Method):
    name: ClassVar[str] = "shout"
    display_name: ClassVar[str] = "Shout"
    scale: float = 2.0

    def loss(self, model, batch, ref):
        raise NotImplementedError


class InProcessPlugin:
    @hookimpl
    def register_methods(self, register):
        register(Shout)


def test_in_process_plugin_registers_method():
    reg = build_registry(strict=True, extra_plugins=[InProcessPlugin()])
    assert reg.methods["shout"] is Shout
    m = build_method(Shout, {"scale": "0.5"})
    assert m.scale == 0.5


def test_duplicate_name_is_error_naming_both_sources():
    class Dup:
        @hookimpl
        def register_methods(self, register):
            @dataclasses.dataclass
            class Fake(Method):
                name: ClassVar[str] = "npo"

            register(Fake)

    with pytest.raises(HarnessError, match=r"method 'npo' is registered twice: by 'builtin:methods/npo.py' and by"):
        build_registry(strict=True, extra_plugins=[Dup()])


def test_broken_plugin_is_isolated_or_strict(tmp_path, caplog):
    d = tmp_path / "plugs"
    d.mkdir()
    (d / "broken.py").write_text("import not_a_real_module_xyz\n")
    (d / "good.py").write_text(textwrap.dedent("""
        import dataclasses
        from typing import ClassVar
        from harness import hookimpl
        from harness.methods import Method

        @dataclasses.dataclass
        class Good(Method):
            name: ClassVar[str] = "good_method"
            def loss(self, model, batch, ref):
                return 0

        @hookimpl
        def register_methods(register):
            register(Good)
    """))
    reg = build_registry(plugins_dirs=[d], strict=False)
    assert "good_method" in reg.methods
    assert any("broken.py" in f and "not_a_real_module_xyz" in f for f in reg.failures)
    assert any("skipping plugin 'plugs/broken.py'" in r.getMessage() for r in caplog.records)
    with pytest.raises(HarnessError, match="plugin 'plugs/broken.py' failed"):
        build_registry(plugins_dirs=[d], strict=True)


def test_typo_hookimpl_is_rejected(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "typo.py").write_text("from harness import hookimpl\n@hookimpl\ndef register_method(register):\n    pass\n")
    with pytest.raises(HarnessError, match="typo.py"):
        build_registry(plugins_dirs=[d], strict=True)


def test_plugin_raising_during_registration_is_named(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "boom.py").write_text("from harness import hookimpl\n@hookimpl\ndef register_methods(register):\n    raise RuntimeError('kaput')\n")
    reg = build_registry(plugins_dirs=[d], strict=False)
    assert any("boom.py" in f and "kaput" in f for f in reg.failures)


def _write(p, text):
    p.write_text(textwrap.dedent(text))
    return p


def test_task_unknown_key_suggests(tmp_path):
    f = _write(tmp_path / "t.yaml", """
        task: t1
        metric: [forget_quality]
        data: {forget: {path: locuslab/TOFU, name: forget01}}
    """)
    with pytest.raises(HarnessError, match=r"t.yaml: unknown key 'metric' \(did you mean 'metrics'[,?]"):
        parse_task(f)


def test_task_missing_field_and_bad_include(tmp_path):
    f = _write(tmp_path / "t.yaml", "task: t1\ndata: {forget: {path: x}}\n")
    with pytest.raises(HarnessError, match=r"t.yaml: task 't1' is missing required field 'metrics'"):
        parse_task(f)
    g = _write(tmp_path / "g.yaml", "task: t2\ninclude: _nope.yaml\nmetrics: [a]\ndata: {f: {path: x}}\n")
    with pytest.raises(HarnessError, match=r"g.yaml: include '_nope.yaml' not found"):
        parse_task(g)
    h = _write(tmp_path / "h.yaml", "task: t3\ninclude: h.yaml\n")
    with pytest.raises(HarnessError, match="include cycle"):
        parse_task(h)
    bad = _write(tmp_path / "bad.yaml", "task: [unclosed\n")
    with pytest.raises(HarnessError, match=r"bad.yaml: line \d+ invalid YAML"):
        parse_task(bad)


def test_include_merges_recursively(tmp_path):
    _write(tmp_path / "_base.yaml", """
        tag: [fam]
        training: {lr: 1.0e-5, epochs: 10}
        data: {retain_eval: {path: locuslab/TOFU, name: retain_perturbed}}
        metrics: [forget_quality]
    """)
    f = _write(tmp_path / "leaf.yaml", """
        task: leaf
        include: _base.yaml
        training: {epochs: 2}
        data: {forget: {path: locuslab/TOFU, name: forget01}}
    """)
    t = parse_task(f)
    assert t.training == {"lr": 1e-5, "epochs": 2}
    assert set(t.data) == {"retain_eval", "forget"} and t.data["forget"].split == "train"
    assert t.tag == ["fam"]


def test_cli_ls_and_unknown_names():
    _, out, _ = run_cli("ls", "tasks")
    for t in TASKS:
        assert t in out
    _, out, _ = run_cli("ls", "models")
    for p in ("tiny", "llama2-7b-chat", "llama3.2-1b-instruct", "llama2-7b", "zephyr-7b-beta"):
        assert p in out
    _, out, _ = run_cli("ls", "methods")
    assert all(m in out for m in BUILTIN_METHODS)
    rc, _, err = run_cli("run", "-t", "tofu_forget1", "-m", "npo", "--dry-run", check=False)
    assert rc == 2 and "did you mean" in err and "'tofu_forget01'" in err and "available:" in err
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npoo", "--dry-run", check=False)
    assert rc == 2 and "unknown method 'npoo'" in err and "'npo'" in err


def test_dry_run_grid_six_runs(tmp_path):
    _, out, _ = run_cli("run", "-t", "tofu_*", "-m", "npo,grad_diff", "--dry-run", "-o", tmp_path)
    assert out.splitlines()[0] == "6 run(s):"
    assert out.count(" x seed 0") == 6
    _, out2, _ = run_cli("run", "-t", "tag:tofu".split(":")[1], "-m", "npo", "--seeds", "0,1", "--dry-run", "-o", tmp_path)
    assert out2.splitlines()[0] == "6 run(s):"
    # the seeds of one configuration share its hash (the report averages them), other settings do not
    dirs = re.findall(r"-> (\S+)$", out2, flags=re.M)
    by_task = {}
    for d in dirs:
        *_, task, method, run = d.split(os.sep)
        by_task.setdefault(task, set()).add(tuple(run.split("-s")))
    assert len(by_task) == 3 and all(len({h for h, _ in runs}) == 1 and {s for _, s in runs} == {"0", "1"}
                                     for runs in by_task.values())
    assert len({h for runs in by_task.values() for h, _ in runs}) == 3


def test_set_override_errors():
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.betaa=0.2", "--dry-run", check=False)
    assert rc == 2 and "method 'npo' has no hyper-parameter 'betaa'" in err and "beta" in err
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.beta=nan", "--dry-run", check=False)
    assert rc == 2 and "must be finite" in err


def test_config_hash_changes_with_config(tmp_path):
    _, a, _ = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--dry-run", "-o", tmp_path)
    _, b, _ = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--set", "npo.beta=0.2", "--dry-run", "-o", tmp_path)
    _, c, _ = run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--dry-run", "-o", tmp_path)
    path = lambda s: s.splitlines()[1].split("-> ")[1]  # noqa: E731
    assert path(a) == path(c) != path(b)


def test_validate_passes():
    _, out, _ = run_cli("validate")
    assert out.startswith("ok: 7 task(s)")
