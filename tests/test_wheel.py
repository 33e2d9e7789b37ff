"""The built wheel carries tasks/, methods/ and registry.yaml, and works without the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("unlearn_harness-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "harness/_builtin/registry.yaml" in names
    assert "harness/_builtin/tasks/tofu/tofu_forget01.yaml" in names
    assert "harness/_builtin/tasks/muse/_base.yaml" in names
    assert "harness/_builtin/methods/npo.py" in names
    assert "harness/bundled/tofu/forget01_perturbed.jsonl" in names
    assert "harness/bundled/tofu/SOURCE.md" in names and "harness/bundled/muse_news/SOURCE.md" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_non_editable_install_lists(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import harness, harness.cli, sys; print(harness.__file__); sys.exit(harness.cli.main(['ls']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(str(target))
    for name in ("tofu_forget01", "muse_books", "npo", "simnpo", "llama3.2-1b-instruct"):
        assert name in r.stdout
    assert "failed" not in r.stdout
