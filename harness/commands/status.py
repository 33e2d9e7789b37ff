"""``harness status RESULTS_DIR``: every cell of a results tree as done, running (claimed by a live
process), queued (submitted to Slurm, not started: its array task and, where sacct answers, its job
state), failed (its last error line and log) or missing (recorded in a grid, never finished)."""

from __future__ import annotations

from pathlib import Path

from harness import HarnessError
from harness.commands.launch import slurm_job_state
from harness.options import StatusOptions
from harness.results.state import STATES, summary


def main(opts: StatusOptions) -> int:
    root = Path(opts.results)
    if not root.is_dir():
        raise HarnessError(f"results folder {root} does not exist; pass the -o/--output folder of `harness run`")
    cells = summary(root, slurm_job_state())
    total = sum(len(v) for v in cells.values())
    if not total:
        raise HarnessError(f"no cells under {root}; run `harness run ... -o {root}` first")
    print(f"{root}: {total} cell(s): " + ", ".join(f"{len(cells[s])} {s}" for s in STATES))
    for st in STATES:
        for rel, failure in cells[st]:
            print(f"{st:<8} {rel}")
            if st == "queued":
                print(f"{'':<8}   Slurm job {failure['job_id']}: {failure['slurm_state'] or 'state unknown (no sacct here)'}")
            elif failure:
                print(f"{'':<8}   error: {failure.get('error') or '?'}")
                print(f"{'':<8}   log: {failure.get('log') or '(none: run in the foreground)'}")
    redo = len(cells["failed"]) + len(cells["missing"])
    if redo:
        print(f"rerun the same `harness run` command to redo the {redo} failed/missing cell(s)")
    return 0
