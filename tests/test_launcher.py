"""--launcher: the grid as a submitit job array (local executor here, Slurm through a stand-in sbatch), and
`harness status` on a tree with finished, claimed, failed and missing cells."""

import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import cheap_task_yaml

from harness.cli import parse_options
from harness.commands import run as runner
from harness.io import write_json
from harness.plugins import get_registry
from harness.results.rundir import claim, is_complete
from harness.results.state import record_grid

TASK = cheap_task_yaml("t16_launch", "forget01 with one cheap metric, for the launcher tests")
TRAIN = ["--limit", "2", "--epochs", "1", "--train-batch-size", "2", "--per-device-batch", "2", "--eval-batch-size", "8"]


@pytest.fixture
def tasks(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t16_launch.yaml").write_text(TASK)
    return d


def argv(tasks, out, *extra):
    return ["run", "-t", "t16_launch", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks", tasks,
            "-o", out, *TRAIN, *extra]


def cli_process(*args, check=True):
    """The CLI in its own process, as run_cli returns it (rc, stdout, stderr): the launcher starts jobs and
    reads what they leave behind, so its tests do not share pytest's process state with earlier tests."""
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0 or not check, f"harness {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.returncode, proc.stdout, proc.stderr


def test_local_launcher_runs_a_two_cell_grid_and_a_rerun_submits_nothing(tasks, tmp_path):
    out = tmp_path / "res"
    sweep = ["--lr", "1e-3,2e-3", "--launcher", "local", "--slurm-array-parallelism", "2"]
    _, stdout, _ = cli_process(*argv(tasks, out, *sweep))
    assert "2 cell(s): 0 done, 0 running, 0 queued, 0 failed, 2 missing; submitting 2" in stdout
    cells = sorted((out / "tiny_full" / "t16_launch" / "grad_ascent").glob("*-s0"))
    assert len(cells) == 2 and all(is_complete(c) for c in cells)
    lrs = sorted(json.loads((c / "scores.json").read_text())["hparams"]["lr"] for c in cells)
    assert lrs == [1e-3, 2e-3]
    logs = sorted((out / ".harness" / "logs").glob("*.log"))
    assert len(logs) == 2 and all("--cell=tiny_full/t16_launch/grad_ascent/" in p.read_text() for p in logs)
    # each job ran under submitit (its own folder of job files), not in this process
    assert len(list((out / ".harness" / "submitit").glob("*/*_result.pkl"))) == 2
    _, stdout, _ = cli_process(*argv(tasks, out, *sweep))
    assert "2 cell(s): 2 done, 0 running, 0 queued, 0 failed, 0 missing; submitting 0" in stdout
    assert "nothing to submit" in stdout
    _, status, _ = cli_process("status", out)
    assert status.splitlines()[0].endswith("3 cell(s): 3 done, 0 running, 0 queued, 0 failed, 0 missing")  # + Finetuned row


def test_status_lists_done_running_failed_missing_and_a_rerun_submits_only_those(tasks, tmp_path, monkeypatch):
    out = tmp_path / "res"
    opts = parse_options(argv(tasks, out, "--lr", "1e-3,2e-3,3e-3,4e-3"))
    done, claimed, failed, missing = runner.expand(opts, get_registry(include_tasks=opts.include_tasks))
    record_grid(out, [runner.rel(c, out) for c in (done, claimed, failed, missing)], ["harness", "run"])
    done.dir.mkdir(parents=True)
    write_json(done.dir / "scores.json", {"task": "t16_launch", "metrics": {}})

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(runner, "_unlearn_and_score", boom)
    monkeypatch.setenv("HARNESS_CELL_LOG", str(tmp_path / "cell.log"))
    with pytest.raises(RuntimeError):
        runner.run_cell(failed, opts)  # the real failure path: the cell records why
    with claim(claimed.dir) as mine:
        assert mine
        _, text, _ = cli_process("status", out)
        # a rerun leaves out the done cell and the one another process holds
        _, sub, _ = cli_process(*argv(tasks, out, "--lr", "1e-3,2e-3,3e-3,4e-3", "--launcher", "slurm"), check=False)
    lines = text.splitlines()
    assert lines[0].endswith("4 cell(s): 1 done, 1 running, 0 queued, 1 failed, 1 missing")
    assert f"done     {runner.rel(done, out)}" in lines
    assert f"running  {runner.rel(claimed, out)}" in lines
    assert f"missing  {runner.rel(missing, out)}" in lines
    i = lines.index(f"failed   {runner.rel(failed, out)}")
    assert lines[i + 1].strip() == "error: RuntimeError: CUDA out of memory (stand-in)"
    assert lines[i + 2].strip() == f"log: {tmp_path / 'cell.log'}"
    assert "4 cell(s): 1 done, 1 running, 0 queued, 1 failed, 1 missing; submitting 2" in sub


def fake_slurm(tmp_path, monkeypatch, sacct: str | None = None):
    """Stand-in sbatch/srun (and sacct printing ``sacct``) on PATH; returns where sbatch copies its script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    copy = tmp_path / "submitted.sh"
    tools = [("sbatch", f'cp "$1" {copy}\necho "Submitted batch job 4242"\n'), ("srun", "exit 0\n")]
    if sacct is not None:
        (tmp_path / "sacct.txt").write_text(sacct)
        tools.append(("sacct", f"cat {tmp_path / 'sacct.txt'}\n"))
    for name, body in tools:
        p = bin_dir / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return copy


def test_slurm_launcher_submits_one_array_with_the_flags(tasks, tmp_path, monkeypatch):
    """A stand-in sbatch/srun on PATH: the array script submitit writes is what a cluster would get."""
    copy = fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "res"
    grid = argv(tasks, out, "--lr", "1e-3,2e-3,3e-3", "--launcher", "slurm", "--slurm-partition", "gpu",
                "--slurm-gpus-per-node", "2", "--slurm-time", "1:30:00", "--slurm-array-parallelism", "2",
                "--slurm-setup", "source /venv/bin/activate", "--slurm-mem", "64g", "--slurm-cpus-per-task", "8")
    _, stdout, _ = cli_process(*grid)
    assert "submitted Slurm job array 4242: 3 task(s)" in stdout
    script = copy.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=90", "#SBATCH --ntasks-per-node=1", "source /venv/bin/activate",
                 "#SBATCH --mem=64G", "#SBATCH --cpus-per-task=8"):
        assert line in script
    assert not (out / "tiny_full").exists()  # nothing ran here
    _, status, _ = cli_process("status", out)
    lines = status.splitlines()
    assert lines[0].endswith("3 cell(s): 0 done, 0 running, 3 queued, 0 failed, 0 missing")
    assert lines[2].strip() == "Slurm job 4242_0: state unknown (no sacct here)"
    # queued cells are not submitted twice
    copy.unlink()
    _, stdout, _ = cli_process(*grid)
    assert "3 cell(s): 0 done, 0 running, 3 queued, 0 failed, 0 missing; submitting 0" in stdout and not copy.exists()


def test_queued_cells_follow_their_slurm_job_state(tasks, tmp_path, monkeypatch):
    """sacct (stand-in) says one task waits, one started, one was cancelled before its cell ran: the
    cancelled one is failed, naming the job, and it alone is resubmitted."""
    fake_slurm(tmp_path, monkeypatch, sacct="JobID|State|NodeList\n4242_0|PENDING|None assigned\n"
                                            "4242_1|RUNNING|node1\n4242_2|CANCELLED by 0|node2\n")
    out = tmp_path / "res"
    grid = argv(tasks, out, "--lr", "1e-3,2e-3,3e-3", "--launcher", "slurm")
    cli_process(*grid)
    _, status, _ = cli_process("status", out)
    lines = status.splitlines()
    assert lines[0].endswith("3 cell(s): 0 done, 0 running, 2 queued, 1 failed, 0 missing")
    assert [ln.strip() for ln in lines if ln.strip().startswith("Slurm job")] == [
        "Slurm job 4242_0: PENDING", "Slurm job 4242_1: RUNNING"]
    i = next(k for k, ln in enumerate(lines) if ln.startswith("failed"))
    assert lines[i + 1].strip() == "error: Slurm job 4242_2 ended CANCELLED by 0 before the cell finished"
    assert lines[i + 2].strip().startswith("log: ") and lines[i + 2].strip().endswith("submitit/4242_2")
    _, stdout, _ = cli_process(*grid)
    assert "3 cell(s): 0 done, 0 running, 2 queued, 1 failed, 0 missing; submitting 1" in stdout
    _, status, _ = cli_process("status", out)  # the stand-in numbers the new array 4242 again: task 0, PENDING
    assert status.splitlines()[0].endswith("3 cell(s): 0 done, 0 running, 3 queued, 0 failed, 0 missing")


def test_bad_slurm_mem_is_one_line(tasks, tmp_path):
    rc, _, err = cli_process(*argv(tasks, tmp_path / "res", "--launcher", "slurm", "--slurm-mem", "lots"),
                             check=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--slurm-mem 'lots'" in err


def test_slurm_launcher_without_slurm_is_one_line(tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch
    rc, _, err = cli_process(*argv(tasks, tmp_path / "res", "--launcher", "slurm"), check=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--launcher slurm" in err and "srun" in err and "--launcher local" in err


def test_status_of_a_folder_without_cells(tmp_path):
    rc, _, err = cli_process("status", tmp_path, check=False)
    assert rc == 2 and "no cells under" in err


def test_a_job_that_dies_before_its_cell_starts_is_recorded_failed(tmp_path, monkeypatch):
    """What one array task does, called directly: the cell's process fails, so the job records why."""
    from harness.commands import job
    from harness.results.state import log_path, read_failure

    monkeypatch.chdir(tmp_path)  # run_one moves to the submission directory
    out, rel = tmp_path / "res", "m/t/npo/abcd1234-s0"
    with pytest.raises(RuntimeError, match="exit code 2"):
        job.run_one(["--tasks=no_such_task", "--methods=npo", f"--output={out}"], rel, str(out), str(tmp_path))
    fail = read_failure(out / rel)
    assert fail["error"].startswith("exit code 2; last output: error: ") and "no_such_task" in fail["error"]
    assert fail["log"] == str(log_path(out, rel))
    _, text, _ = cli_process("status", out)
    assert f"failed   {rel}" in text.splitlines()
