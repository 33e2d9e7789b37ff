"""``harness run --launcher slurm|local``: the grid's cells as one submitit job array.

Each array task runs ``harness run <the same flags> --cell <model>/<task>/<method>/<hash8>-s<seed>`` in a
subprocess, so a cell in a job behaves exactly as one run by hand: it claims its run directory (the
lock still guards it against a second job or a user), scores its task's Finetuned row if nobody has yet,
and with ``--accelerate`` relaunches itself under ``accelerate launch`` inside the allocation. Each
submitted Slurm cell gets a queued marker naming its array task; ``harness status`` shows it queued until
it starts, asking ``sacct`` (through submitit) whether the job ended without starting it. Before
submitting, done, running and queued cells are left out, so rerunning the same command submits only the
missing and failed ones. ``local`` runs the same path through submitit's LocalExecutor and waits for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from harness import HarnessError
from harness.commands import job
from harness.options import RunOptions, slurm_mem, slurm_minutes
from harness.plugins import one_line
from harness.results.state import STATES, cell_state, launch_dir, read_failure, record_grid, write_queued


def submit(rels: list[str], opts: RunOptions) -> int:
    """Submit the cells ``rels`` (``<model>/<task>/<method>/<hash8>-s<seed>`` under ``opts.output``) that
    are not done or running; with the local executor, wait for them. Returns the exit code."""
    output = Path(opts.output)
    argv = opts.launch_argv()
    record_grid(output, rels, ["harness", "run", *argv, f"--launcher={opts.launcher}"])
    job_state = slurm_job_state()
    states = {r: cell_state(output, r, job_state)[0] for r in rels}
    counts = {s: sum(v == s for v in states.values()) for s in STATES}
    todo = [r for r in rels if states[r] not in ("running", "queued")
            and (opts.overwrite or states[r] in ("missing", "failed"))]
    print(f"{len(rels)} cell(s): " + ", ".join(f"{counts[s]} {s}" for s in STATES) + f"; submitting {len(todo)}")
    if not todo:
        print(f"nothing to submit (harness status {output})")
        return 0
    executor = _executor(opts, output)
    if opts.launcher == "slurm":
        jobs = _map(executor, argv, todo, output)
        for rel, j in zip(todo, jobs):
            write_queued(output, rel, str(j.job_id), str(executor.folder))
        array = str(jobs[0].job_id).split("_")[0]
        print(f"submitted Slurm job array {array}: {len(jobs)} task(s); submitit files in {executor.folder.parent}")
        print(f"follow it with: harness status {output}   (rerun this command to resubmit missing/failed cells)")
        return 0
    failures = _run_locally(executor, argv, todo, output, opts.slurm_array_parallelism or 1)
    for r in failures:
        fail = read_failure(output / r) or {}
        print(f"failed: {r}: {fail.get('error', '?')} (log: {fail.get('log', '?')})")
    return 1 if failures else 0


def slurm_job_state():
    """For ``cell_state``: a queued cell's Slurm job state through submitit's sacct watcher, one sacct call
    per job array ("" where there is no sacct to ask, e.g. away from the cluster)."""
    if shutil.which("sacct") is None:
        return lambda marker: ""
    import submitit

    watcher, asked = submitit.SlurmJob.watcher, set()

    def job_state(marker: dict) -> str:
        job_id = str(marker.get("job_id") or "")
        if not job_id:
            return ""
        watcher.register_job(job_id)
        if job_id.split("_")[0] not in asked:  # sacct -j ARRAY answers for all its tasks
            asked.add(job_id.split("_")[0])
            watcher.update()
        state = watcher.get_state(job_id, mode="cache")
        return "" if state == "UNKNOWN" else state

    return job_state


def _map(executor, argv: list[str], cells: list[str], output: Path) -> list:
    n = len(cells)
    try:
        return executor.map_array(job.run_one, [argv] * n, cells, [str(output)] * n, [os.getcwd()] * n)
    except FileNotFoundError as exc:  # no sbatch on this machine
        raise HarnessError(f"--launcher slurm: {exc.filename or 'sbatch'} not found; submit from a Slurm login "
                           "node (or test the same path with --launcher local)") from None
    except subprocess.CalledProcessError as exc:
        raise HarnessError(f"--launcher slurm: sbatch failed: {last_line_of(exc.output)}") from None


def last_line_of(text) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _run_locally(executor, argv: list[str], cells: list[str], output: Path, slots: int) -> list[str]:
    """Local jobs, at most ``slots`` at a time (Slurm's array parallelism); returns the failed cells."""
    pending, running, failures = list(cells), [], []
    while pending or running:
        while pending and len(running) < slots:
            cell = pending.pop(0)
            running.append((cell, _map(executor, argv, [cell], output)[0]))
        time.sleep(0.5)
        for cell, j in [x for x in running if x[1].done()]:
            running.remove((cell, j))
            try:
                j.result()
            except Exception:  # the job's own traceback stays in submitit's folder; the cell says why in one line
                failures.append(cell)
    return failures


def _executor(opts: RunOptions, output: Path):
    try:
        import submitit
    except ImportError:
        raise HarnessError("--launcher needs the submitit package: pip install submitit") from None
    folder = launch_dir(output) / "submitit" / "%j"
    minutes = slurm_minutes(opts.slurm_time)
    if opts.launcher == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as exc:  # submitit looks for srun first
            raise HarnessError(f"--launcher slurm: {one_line(exc)}; submit from a Slurm login node "
                               "(or test the same path with --launcher local)") from None
        params = {"job_name": "harness-run", "time": minutes, "nodes": 1, "ntasks_per_node": 1,
                  "gpus_per_node": opts.slurm_gpus_per_node, "partition": opts.slurm_partition,
                  "array_parallelism": opts.slurm_array_parallelism, "setup": opts.slurm_setup or None,
                  "mem": slurm_mem(opts.slurm_mem), "cpus_per_task": opts.slurm_cpus_per_task}
    else:
        executor = submitit.LocalExecutor(folder=folder)
        params = {"timeout_min": minutes, "gpus_per_node": opts.slurm_gpus_per_node or 0,
                  "setup": opts.slurm_setup or None}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor
