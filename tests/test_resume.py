"""Nothing is lost on interruption: atomic writes, per-run locks, and a grid that is killed (SIGKILL),
interrupted (SIGINT) and then finished by two concurrent processes on the same results directory."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, cheap_task_yaml

from harness.commands import run as runner
from harness.io import write_json
from harness.results.rundir import claim, is_complete

TASK = cheap_task_yaml("t7_resume", "forget01 with one cheap metric, for the resume tests")

# a built-in, the example plugin (installed as a user would) and NPO: the plugin benchmarked next to NPO
METHODS = ("grad_ascent", "maxent", "npo")
STEPS = 2  # --limit 4 rows, effective batch 2, one epoch


# ---------------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "scores.json"
    write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["scores.json"]


def test_atomic_writes_get_the_umask_mode_not_a_private_one(tmp_path):
    """Results on a shared filesystem stay readable by others (a temp file alone would be 0600)."""
    write_json(tmp_path / "a.json", {"x": 1})
    plain = tmp_path / "plain"
    plain.write_text("")
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777
    assert mode & 0o044 or os.umask(os.umask(0)) & 0o044  # group/other read unless the umask removes it


def test_sigkill_during_writes_never_leaves_a_torn_file(tmp_path):
    p = tmp_path / "big.json"
    code = textwrap.dedent(f"""
        import sys
        from harness.io import write_json
        i = 0
        while True:
            write_json({str(p)!r}, {{"i": i, "pad": "x" * 2_000_000}})
            if i == 0:
                print("first", flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "first"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    doc = json.loads(p.read_text())  # whole: either an old or a new version, never half of one
    assert doc["i"] >= 0 and len(doc["pad"]) == 2_000_000


def test_truncated_scores_file_is_not_a_finished_run(tmp_path):
    (tmp_path / "scores.json").write_text('{"metrics": {"a": ')
    assert not is_complete(tmp_path)
    (tmp_path / "scores.json").write_text('{"metrics": {}}')
    assert is_complete(tmp_path)


def test_claim_is_exclusive_across_processes(tmp_path):
    d = tmp_path / "cell"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib\nfrom harness.results.rundir import claim\n"
         f"with claim(pathlib.Path({str(d)!r})) as mine:\n    print(mine, flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "True"
        with claim(d) as mine:
            assert mine is False
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with claim(d) as mine:  # the kernel drops a dead holder's lock: a killed run never blocks a rerun
        assert mine is True


def test_runner_skips_a_cell_another_process_holds(tmp_path, monkeypatch):
    from harness.cli import parse_options
    from harness.plugins import get_registry

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t7_resume.yaml").write_text(TASK)
    args = parse_options(["run", "-t", "t7_resume", "-m", "grad_ascent", "--model", "tiny:full",
                          "--include-tasks", tasks, "-o", tmp_path / "res", "--limit", "2"])
    (cell,) = runner.expand(args, get_registry(include_tasks=args.include_tasks))
    monkeypatch.setattr("harness.models.load.load_model", lambda *a, **k: pytest.fail("must not load a claimed cell"))
    with claim(cell.dir) as mine:
        assert mine
        assert runner.run_cell(cell, args) is None
    assert not is_complete(cell.dir)


# ------------------------------------------------------------------------------ kill and resume
def _cmd(tasks, out):
    return [sys.executable, "-m", "harness", "run", "-t", "t7_resume", "-m", ",".join(METHODS), "--model", "tiny:full",
            "--include-tasks", str(tasks), "-o", str(out), "--limit", "4", "--epochs", "1", "--train-batch-size", "2",
            "--per-device-batch", "2", "--eval-batch-size", "8"]


def _cells(out, method):
    return sorted((out / "tiny_full" / "t7_resume" / method).glob("*-s0"))


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def test_kill_interrupt_and_concurrent_resume(tmp_path, tiny_full_dir):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t7_resume.yaml").write_text(TASK)
    out = tmp_path / "results"
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(site), str(ROOT / "examples" / "harness-example-method")],
                         capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stderr
    path = [str(ROOT), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    # without the RANK/LOCAL_RANK/MASTER_PORT/ACCELERATE_USE_DEEPSPEED an earlier in-process ZeRO-3 test left
    # in this process: the children would believe they run under a launcher and share one port (EADDRINUSE
    # when two run at once)
    launcher_env = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_env and not k.startswith("ACCELERATE_")},
           "PYTHONPATH": os.pathsep.join(path)}
    # SIG_DFL in the child: a shell job started with `&` ignores SIGINT and its children inherit that,
    # which would make Python skip installing its KeyboardInterrupt handler
    popen = lambda: subprocess.Popen(_cmd(tasks, out), env=env, stdout=subprocess.PIPE,  # noqa: E731
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    # 1. SIGKILL as soon as the first cell has finished
    p1 = popen()
    _wait_for(lambda: any(is_complete(d) for d in _cells(out, "grad_ascent")), p1)
    p1.send_signal(signal.SIGKILL)
    p1.wait(timeout=60)
    (first,) = _cells(out, "grad_ascent")
    kept = (first / "scores.json").read_bytes(), (first / "scores.json").stat().st_mtime_ns
    assert not any(is_complete(d) for m in METHODS[1:] for d in _cells(out, m))

    # 2. SIGINT (Ctrl-C) in the middle of the second cell: exit 130, the message, nothing half-written kept
    # (the killed process may already have left a config.yaml in the maxent cell: wait for p2's own)
    started = time.time_ns()
    p2 = popen()
    _wait_for(lambda: any((d / "config.yaml").exists() and (d / "config.yaml").stat().st_mtime_ns > started
                          for d in _cells(out, "maxent")) and p2.poll() is None, p2)
    p2.send_signal(signal.SIGINT)
    _, err2 = p2.communicate(timeout=120)
    assert p2.returncode == 130, err2[-3000:]
    assert "interrupted: finished runs are kept; rerun the same command to resume" in err2
    assert "Traceback" not in err2
    assert not any(is_complete(d) for d in _cells(out, "maxent"))

    # 3. two processes finish the grid together on the same results directory
    p3, p4 = popen(), popen()
    outs = [p.communicate(timeout=300) for p in (p3, p4)]
    assert (p3.returncode, p4.returncode) == (0, 0), [e[-3000:] for _, e in outs]
    logs = "\n".join(e for _, e in outs)
    tables = "\n".join(o for o, _ in outs)
    for m in METHODS:  # the printed summary has every method, the plugin's next to NPO's
        assert re.search(rf"\| t7_resume \| {m} +\| 0 +\| \d", tables), tables
    assert logs.count("skip t7_resume x grad_ascent x seed 0: finished earlier") == 2
    assert ((first / "scores.json").read_bytes(), (first / "scores.json").stat().st_mtime_ns) == kept
    for m in METHODS:
        (d,) = _cells(out, m)
        assert is_complete(d), m
        scores = json.loads((d / "scores.json").read_text())
        assert scores["partial"] is True and "forget_Q_A_Prob" in scores["metrics"]
        steps = [json.loads(line)["step"] for line in (d / "train_log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), (m, steps)  # each cell trained once, not twice over
    assert not list(out.rglob("*.tmp"))
