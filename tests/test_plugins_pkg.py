"""Third-party plugins as users ship them: the example package installed with pip (entry point), a
copied-and-renamed editable install, the HARNESS_PLUGINS allowlist, --plugins-dir and `harness ls plugins`."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, run_cli

from harness import plugins

EXAMPLE = ROOT / "examples" / "harness-example-method"
PIP = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]


def _pip(*args):
    r = subprocess.run([*PIP, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _renamed_copy(dst):
    """What a new user does: copy the example, rename distribution, package, entry point and method."""
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns(".pytest_cache", "__pycache__", "*.egg-info"))
    (dst / "harness_example_method").rename(dst / "my_unlearn_method")
    for f in (dst / "pyproject.toml", dst / "my_unlearn_method" / "__init__.py"):
        text = (f.read_text().replace("harness-example-method", "my-unlearn-method")
                .replace("harness_example_method", "my_unlearn_method").replace('version = "0.1.0"', 'version = "2.3.0"')
                .replace('maxent = "my_unlearn_method"', 'mine = "my_unlearn_method"')
                .replace('name: ClassVar[str] = "maxent"', 'name: ClassVar[str] = "my_maxent"'))
        f.write_text(text)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example installed (wheel) into a target dir, and a renamed copy installed editable into a prefix."""
    base = tmp_path_factory.mktemp("plugin-install")
    target = base / "target"
    _pip("--target", target, EXAMPLE)
    copy = _renamed_copy(base / "my-unlearn-method")
    prefix = base / "prefix"
    _pip("--prefix", prefix, "-e", copy)
    site_dir = next(prefix.glob("lib/python*/site-packages"))
    return {"target": target, "copy": copy, "site": site_dir}


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


def _cli_in_fresh_process(site_dirs, *commands, env=None):
    """Run several `harness` commands in one new interpreter whose site dirs include ``site_dirs``
    (processing their .pth files, as an installed environment would)."""
    driver = textwrap.dedent("""
        import site, sys, json
        for d in json.loads(sys.argv[1]):
            site.addsitedir(d)
        from harness.cli import main
        for argv in json.loads(sys.argv[2]):
            print("=== " + " ".join(argv), flush=True)
            print("rc", main(argv), flush=True)
    """)
    import json

    full_env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-c", driver, json.dumps(list(map(str, site_dirs))), json.dumps(commands)],
                       capture_output=True, text=True, timeout=180, env=full_env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, r.stderr


def _row(out, name):
    return next((line.split() for line in out.splitlines() if line.split()[:1] == [name]), None)


def test_installed_plugins_are_listed_and_benchmarked_next_to_npo(installed, tmp_path):
    out, err = _cli_in_fresh_process(
        [installed["target"], installed["site"]],
        ["ls", "methods"], ["ls", "plugins"],
        ["run", "-t", "tofu_forget01", "-m", "maxent,my_maxent,wga,npo", "--set", "my_maxent.alpha=0.5", "--dry-run",
         "-o", str(tmp_path)])
    assert "Traceback" not in err
    assert _row(out, "maxent")[:6] == ["maxent", "MaxEnt", "none", "no", "harness-example-method", "0.1.0"]
    assert "gamma=1.0, alpha=1.0" in out
    assert _row(out, "wga")[:5] == ["wga", "WGA", "none", "no", "unlearn-harness"]  # the built-in, no collision
    # the copied, renamed, editable-installed method: its own name, distribution and version
    assert _row(out, "my_maxent")[:6] == ["my_maxent", "MaxEnt", "none", "no", "my-unlearn-method", "2.3.0"]
    assert _row(out, "mine")[:6] == ["mine", "entrypoint", "my-unlearn-method", "2.3.0", "loaded", "1"]
    assert _row(out, "maxent")[:1] == ["maxent"] and "entrypoint" in out
    assert "4 run(s):" in out
    grid = out.split("4 run(s):")[1]
    assert "tofu_forget01 x maxent x seed 0" in grid and "tofu_forget01 x npo x seed 0" in grid
    assert "method: {gamma: 1.0, alpha: 0.5}" in grid  # the --set reached the renamed copy
    assert out.count("rc 0") == 3


def test_editable_install_runs_the_copy_in_place(installed):
    # editing the source of an editable install takes effect without reinstalling
    src = installed["copy"] / "my_unlearn_method" / "__init__.py"
    src.write_text(src.read_text().replace('display_name: ClassVar[str] = "MaxEnt"',
                                          'display_name: ClassVar[str] = "MyMaxEnt"'))
    out, _ = _cli_in_fresh_process([installed["site"]], ["ls", "methods", "my_*"])
    assert _row(out, "my_maxent")[:2] == ["my_maxent", "MyMaxEnt"]


EXAMPLE_TESTS = sorted(n for n in (EXAMPLE / "tests" / "test_maxent.py").read_text().split()
                       if n.startswith("test_") and n.endswith("():"))


@pytest.mark.parametrize("name", [n[:-3] for n in EXAMPLE_TESTS])
def test_example_package_own_tests_pass(installed, monkeypatch, name):
    """The example's own test file, run here against the installed package (plugin authors run it with pytest)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(installed["target"]))
    spec = importlib.util.spec_from_file_location("example_test_maxent", EXAMPLE / "tests" / "test_maxent.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.harness_example_method.__file__.startswith(str(installed["target"]))
    getattr(mod, name)()


@pytest.mark.parametrize("allow, present", [(None, True), ("", False), ("harness_example_method", True),
                                            ("Harness-Example-Method,other", True), ("other-dist", False)])
def test_allowlist(installed, monkeypatch, fresh_registry, allow, present):
    monkeypatch.syspath_prepend(str(installed["target"]))
    if allow is None:
        monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("HARNESS_PLUGINS", allow)
    _, methods, _ = run_cli("ls", "methods")
    assert (_row(methods, "maxent") is not None) is present
    assert _row(methods, "npo") is not None  # built-ins are never filtered
    _, listing, _ = run_cli("ls", "plugins")
    status = _row(listing, "maxent")
    assert status[:5] == ["maxent", "entrypoint", "harness-example-method", "0.1.0", "loaded" if present else "disabled"]
    if not present:
        assert "not in HARNESS_PLUGINS" in listing
        rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "maxent", "--dry-run", check=False)
        assert rc == 2 and "unknown method 'maxent'" in err


DRAFT = """
    import dataclasses
    from typing import ClassVar
    from harness import hookimpl
    from harness.losses import forward_logits, token_mean_nll
    from harness.methods import Method

    @dataclasses.dataclass
    class Draft(Method):
        name: ClassVar[str] = "draft_ga"
        scale: float = 1.0
        def loss(self, model, batch, ref):
            f = batch["forget"]
            return -self.scale * token_mean_nll(forward_logits(model, f), f["labels"])

    @hookimpl
    def register_methods(register):
        register(Draft)
"""


def test_plugins_dir_loads_drafts_and_ls_plugins_explains_failures(tmp_path, monkeypatch, fresh_registry):
    d = tmp_path / "drafts"
    d.mkdir()
    (d / "draft.py").write_text(textwrap.dedent(DRAFT))
    _, out, _ = run_cli("ls", "methods", "--plugins-dir", d)
    assert _row(out, "draft_ga")[:5] == ["draft_ga", "draft_ga", "none", "no", "drafts/draft.py"]
    _, out, _ = run_cli("run", "-t", "tofu_forget01", "-m", "draft_ga", "--set", "draft_ga.scale=2", "--dry-run",
                        "-o", tmp_path / "res", "--plugins-dir", d)
    assert "method: {scale: 2.0}" in out
    (d / "broken.py").write_text("import not_installed_dependency_xyz\n")
    plugins._CACHE.clear()  # the directory changed; a real CLI call is a new process
    # strict (the test suite, `harness validate`): one error line naming the plugin and the cause
    rc, _, err = run_cli("ls", "methods", "--plugins-dir", d, check=False)
    assert rc == 2
    assert err.strip() == ("error: plugin 'drafts/broken.py' failed: ModuleNotFoundError: "
                           "No module named 'not_installed_dependency_xyz'")
    # lenient (the default for users): the broken file is skipped, the rest works, ls plugins says why
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")
    plugins._CACHE.clear()
    _, out, _ = run_cli("ls", "plugins", "--plugins-dir", d)
    assert _row(out, "drafts/broken.py")[:4] == ["drafts/broken.py", "plugins-dir", "-", "failed"]
    assert "ModuleNotFoundError: No module named 'not_installed_dependency_xyz'" in out
    assert _row(out, "drafts/draft.py")[:5] == ["drafts/draft.py", "plugins-dir", "-", "loaded", "1"]
    rc, _, err = run_cli("run", "-t", "tofu_forget01", "-m", "broken_method", "--dry-run", "--plugins-dir", d,
                         check=False)
    assert rc == 2 and "plugins that failed to load: drafts/broken.py: ModuleNotFoundError" in err


def test_plugin_code_runs_only_from_explicit_sources(tmp_path, monkeypatch, fresh_registry):
    """A .py file lying in the working directory, the results directory or a task directory is never
    imported: plugin code comes from installed distributions, --plugins-dir or registry.yaml only."""
    marker = tmp_path / "imported.txt"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for where in ("", "plugins/", "results/", "tasks/"):
        (tmp_path / where).mkdir(exist_ok=True)
        (tmp_path / where / "harness_plugin.py").write_text(payload)
        (tmp_path / where / "conftest_plugin.py").write_text(payload)
    (tmp_path / "tasks" / "t.yaml").write_text(
        "task: t_local\ninclude: ../harness_plugin.py\nmetrics: [forget_Q_A_Prob]\ndata: {forget: {path: x}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "0")
    run_cli("ls", "plugins")
    run_cli("run", "-t", "tofu_forget01", "-m", "npo", "--dry-run", "-o", tmp_path / "results")
    # an include is read as YAML data, never imported (validate: a task file that fails is an error)
    rc, _, err = run_cli("validate", "--include-tasks", tmp_path / "tasks", check=False)
    assert rc == 2 and "harness_plugin.py" in err
    assert not marker.exists()
