"""Test environment: offline, CPU, test-size tiny models in a per-session HARNESS_HOME."""

import os
import sys
import tempfile
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  DS_ACCELERATOR="cpu", HARNESS_TINY_SIZE="test", HARNESS_STRICT_PLUGINS="1",
                  TOKENIZERS_PARALLELISM="false")
os.environ.setdefault("HARNESS_HOME", tempfile.mkdtemp(prefix="harness-test-home-"))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and parallel test workers thrash with them."""
    from harness.testing import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def tok():
    """The character-level tokenizer of ``harness.testing`` (for tests that build their own tiny Llama)."""
    from harness.testing import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_full_dir():
    from harness.models.tiny import tiny_model_dir

    return tiny_model_dir("full")


@pytest.fixture(scope="session")
def tiny_retain99_dir():
    from harness.models.tiny import tiny_model_dir

    return tiny_model_dir("retain99")


def run_two_processes(script, out_dir, mode: str, *args, timeout: int = 400) -> list[dict]:
    """Run a test file as a 2-process ``accelerate launch`` job (``mode``: ddp or zero3) with
    ``out_dir`` and ``args`` as its arguments; returns each rank's ``rank<N>.json`` from ``out_dir``."""
    import json
    import subprocess

    from harness.training.distributed import launch_command

    script = Path(script).resolve()
    argv = [str(out_dir), *map(str, args)]
    cmd, env = launch_command(argv, mode, num_processes=2, module="harness")
    i = cmd.index("-m", 3)  # run the test file instead of the harness module
    cmd = [*cmd[:i], str(script), *argv]
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(2)]


def run_cli(*argv, check=True):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(map(str, argv)))
    if check and rc != 0:
        raise AssertionError(f"harness {' '.join(map(str, argv))} -> {rc}\n{out.getvalue()}\n{err.getvalue()}")
    return rc, out.getvalue(), err.getvalue()


def cheap_task_yaml(name: str, description: str) -> str:
    """A forget01 task scored by one cheap metric (no generation, no reference), for fast end-to-end runs."""
    return f"""\
task: {name}
include: {ROOT}/tasks/tofu/_base.yaml
description: {description}
data:
  forget: {{path: locuslab/TOFU, name: forget01}}
  retain: {{path: locuslab/TOFU, name: retain99}}
  forget_eval: {{path: locuslab/TOFU, name: forget01_perturbed}}
  holdout: {{path: locuslab/TOFU, name: holdout01}}
metrics: [forget_Q_A_Prob]
"""


sys.modules.setdefault("harness_test_helpers", sys.modules[__name__])
