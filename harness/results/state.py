"""Where each cell of a results tree stands, for ``harness status`` and for a resubmission: done
(``scores.json``), running (its claim is held), queued (submitted to Slurm and not started: a marker
written at submission, checked against the scheduler's job state where it can be asked), failed
(``failed.json``: the last error line and the log), or missing. ``harness run`` records the cells of every grid it starts under ``<output>/.harness/grids/``,
so a cell that never started is listed as missing too."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from harness.io import config_hash, file_lock, write_json
from harness.results.rundir import is_complete

FAILED = "failed.json"
STATES = ("done", "running", "queued", "failed", "missing")
# Slurm job states after which a job never starts its cell (sacct's names; CANCELLED may read "CANCELLED by 0")
ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "TIMEOUT")
_CELL = re.compile(r"^[0-9A-Za-z]+-s-?\d+$")


def launch_dir(output) -> Path:
    """The harness's own files beside the results (hidden, so the report never reads them as runs)."""
    return Path(output) / ".harness"


def log_path(output, rel: str) -> Path:
    """A launched cell's log, outside the cell so ``--overwrite`` never moves it aside."""
    return launch_dir(output) / "logs" / (rel.replace("/", "__") + ".log")


def write_failure(d: Path, error: str, log: str | None = None) -> None:
    write_json(Path(d) / FAILED, {"error": error, "log": log, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def clear_failure(d: Path) -> None:
    (Path(d) / FAILED).unlink(missing_ok=True)


def read_failure(d: Path) -> dict | None:
    data = read_json_or_none(Path(d) / FAILED)
    return data if isinstance(data, dict) else None


def is_running(d: Path) -> bool:
    """True while another process holds the cell's claim (an flock, gone when its holder dies)."""
    lock = Path(d) / ".lock"
    if not lock.is_file():
        return False
    with file_lock(lock, wait=False) as free:
        return not free


def state(d: Path) -> str:
    d = Path(d)
    if is_complete(d):
        return "done"
    if not d.is_dir():
        return "missing"
    if is_running(d):
        return "running"
    return "failed" if (d / FAILED).is_file() else "missing"


def queued_path(output, rel: str) -> Path:
    return launch_dir(output) / "queued" / (rel.replace("/", "__") + ".json")


def write_queued(output, rel: str, job_id: str, folder: str) -> None:
    """At submission: the cell waits in the scheduler as array task ``job_id`` (submitit files in ``folder``)."""
    write_json(queued_path(output, rel), {"job_id": job_id, "folder": folder, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def read_queued(output, rel: str) -> dict | None:
    """The submission marker of a cell that has not started since it was submitted, else None."""
    path = queued_path(output, rel)
    data = read_json_or_none(path)
    if not isinstance(data, dict):
        return None
    failed = Path(output) / rel / FAILED
    if failed.is_file() and failed.stat().st_mtime >= path.stat().st_mtime:  # it ran and failed since
        return None
    return data


def cell_state(output, rel: str, job_state=None) -> tuple[str, dict | None]:
    """(state, detail): the failure record of a failed cell, the marker of a queued one. ``job_state(marker)``
    asks the scheduler for a queued cell's job state ("" when it cannot tell); a job that ended without its
    cell finishing makes the cell failed, naming the job and its state."""
    d = Path(output) / rel
    st = state(d)
    if st in ("done", "running"):
        return st, None
    marker = read_queued(output, rel)
    if marker is not None:
        js = job_state(marker) if job_state else ""
        marker = {**marker, "slurm_state": js}
        if js.split(" ")[0] not in ENDED:
            return "queued", marker
        if not d.joinpath(FAILED).is_file():
            return "failed", {"error": f"Slurm job {marker['job_id']} ended {js} before the cell finished",
                              "log": str(marker.get("folder") or "").replace("%j", marker["job_id"]) or None}
    return st, read_failure(d) if st == "failed" else None


def record_grid(output, rels: list[str], command: list[str]) -> Path:
    """Remember the cells a command asked for (one file per distinct grid, rewritten on rerun)."""
    path = launch_dir(output) / "grids" / f"{config_hash({'cells': sorted(rels)})}.json"
    write_json(path, {"command": command, "cells": rels, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path


def tree_cells(output) -> list[str]:
    """Every cell the tree knows: those of recorded grids, in their order, then the run folders found."""
    root = Path(output)
    rels: dict[str, None] = {}
    for grid in sorted((launch_dir(root) / "grids").glob("*.json"), key=lambda p: p.stat().st_mtime):
        data = read_json_or_none(grid)
        for rel in (data or {}).get("cells", []):
            rels.setdefault(str(rel))
    for d in sorted(root.glob("*/*/*/*")):
        rel = d.relative_to(root).as_posix()
        if d.is_dir() and _CELL.match(d.name) and not any(p.startswith(".") for p in rel.split("/")):
            rels.setdefault(rel)
    return list(rels)


def summary(output, job_state=None) -> dict[str, list[tuple[str, dict | None]]]:
    """state -> [(cell, failure record / queued marker or None)] over ``tree_cells`` (see ``cell_state``)."""
    out: dict[str, list] = {s: [] for s in STATES}
    for rel in tree_cells(output):
        st, detail = cell_state(output, rel, job_state)
        out[st].append((rel, detail))
    return out


def last_line(path: Path | None) -> str:
    """The last non-empty line of a log that is not a progress bar (what a killed process last said)."""
    try:
        text = Path(path).read_text(errors="replace")
    except (OSError, TypeError):
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and "%|" not in ln]  # tqdm bars: "... 40%|████ | 160/400 [...]"
    return lines[-1] if lines else ""


def read_json_or_none(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
