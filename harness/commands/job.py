"""One array task of ``harness run --launcher``: a small module, so that a job process imports little
before it starts the cell's own ``harness run`` process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.results.rundir import is_complete
from harness.results.state import FAILED, is_running, last_line, log_path, write_failure

LOG_ENV = "HARNESS_CELL_LOG"  # where the cell's output goes (named in its failed.json)


def run_one(argv: list[str], cell: str, output: str, cwd: str) -> str:
    """One array task: run one cell in a subprocess, its output in the cell's log; raises when it failed."""
    os.chdir(cwd)  # relative paths in argv mean what they meant where the grid was submitted
    log = log_path(output, cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "harness", "run", *argv, f"--cell={cell}"]
    start = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, LOG_ENV: str(log)})
    d = Path(output) / cell
    if rc == 0 and (is_complete(d) or is_running(d)):  # done, or another job holds it (a duplicate submission)
        return cell
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
    line = last_line(log)
    if not is_complete(d):
        marker = d / FAILED
        if not marker.is_file() or marker.stat().st_mtime < start:  # killed before the cell could say why
            write_failure(d, f"{how}; last output: {line}" if line else how, str(log))
    raise RuntimeError(f"cell {cell} failed ({how}): {line} (log: {log})")


