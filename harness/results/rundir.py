"""Run directories: content-addressed by the resolved config, resumable, safe to share.

``<output>/<model>/<task>/<method>/<hash8>-s<seed>/``; ``scores.json`` is written last, so its
presence marks a finished run. A per-run lock keeps two processes off the same cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import __version__
from harness.io import config_hash, file_lock, make_dirs, write_yaml
from harness.paths import safe_name


def run_dir(output, model: str, task: str, method: str, config: dict, seed: int) -> Path:
    """``<model>/<task>/<method>/<hash8>-s<seed>``; the hash leaves the seed out, so the seeds of one
    configuration share it and the report averages them (and only them)."""
    shared = {k: v for k, v in config.items() if k != "seed"}
    if isinstance(shared.get("training"), dict):
        shared["training"] = {k: v for k, v in shared["training"].items() if k != "seed"}
    for value, what in ((model, "model label"), (task, "task name"), (method, "method name")):
        safe_name(value, what)  # names from YAML, plugins and flags must not climb out of `output`
    return Path(output) / model / task / method / f"{config_hash(shared)}-s{seed}"


def is_complete(d: Path) -> bool:
    p = Path(d) / "scores.json"
    if not p.is_file():
        return False
    try:
        json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def claim(d: Path):
    """Exclusive claim on a run directory; yields False when another process holds it.

    Under a multi-process launch the ranks of one job work on the same cell together: only rank 0
    locks, and it waits for the lock instead of skipping, so every rank takes the same decision.
    Once held, a result that a killed ``--overwrite`` had moved aside is put back (``recover``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    make_dirs(d)  # names a file that is in the way of -o, not only the run directory
    if world > 1 and rank != 0:
        yield True
        return
    with file_lock(d / ".lock", wait=world > 1) as held:
        if held:
            # temp files of a process killed mid-write (SIGKILL) are garbage once we hold the lock
            for stale in d.glob(".*.tmp"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
            recover(d)
        yield held


# --overwrite keeps the finished result inside the cell until the new one is finished. States, each
# recoverable after a kill: MOVING (old files being moved aside: all of them are old), ASIDE (the cell
# holds only the new run's files), RESTORING (new files deleted, old ones being moved back).
MOVING, ASIDE, RESTORING = ".previous.tmp", ".previous", ".previous.restoring"
_KEEP = (".lock", MOVING, ASIDE, RESTORING)


def _move_all(src: Path, d: Path) -> None:
    for f in sorted(src.iterdir()):
        os.replace(f, d / f.name)
    src.rmdir()


def _remove(f: Path) -> None:
    if f.is_dir() and not f.is_symlink():
        shutil.rmtree(f)
    else:
        f.unlink(missing_ok=True)


def _restore(d: Path) -> None:
    for f in d.iterdir():
        if f.name not in _KEEP:
            _remove(f)
    os.replace(d / ASIDE, d / RESTORING)
    _move_all(d / RESTORING, d)


def recover(d: Path, done: Callable[[Path], bool] = is_complete) -> None:
    """Finish what a killed ``--overwrite`` left: the old result comes back unless the new one finished."""
    d = Path(d)
    if (d / MOVING).is_dir():
        _move_all(d / MOVING, d)
    if (d / RESTORING).is_dir():
        _move_all(d / RESTORING, d)
    if (d / ASIDE).is_dir():
        if done(d):
            shutil.rmtree(d / ASIDE)
        else:
            _restore(d)


@contextlib.contextmanager
def replacing(d: Path, overwrite: bool, done: Callable[[Path], bool] = is_complete):
    """Around the work that rewrites a finished run ``d`` (hold its ``claim``): with ``overwrite`` the old
    files move to ``d/.previous/`` first (``scores.json`` first, so ``d`` never reads as finished with
    mixed files) and come back when the new run does not finish (error, Ctrl-C); they are deleted only
    once ``done(d)`` holds for the new run. Without ``overwrite`` or a finished run it does nothing."""
    d = Path(d)
    if not (overwrite and done(d)) or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    moving = d / MOVING
    moving.mkdir()
    for f in sorted((f for f in d.iterdir() if f.name not in _KEEP), key=lambda f: f.name != "scores.json"):
        os.replace(f, moving / f.name)
    os.replace(moving, d / ASIDE)
    try:
        yield
    finally:
        if done(d):
            shutil.rmtree(d / ASIDE)
        else:
            _restore(d)


def provenance() -> dict:
    """Versions and the command line, recorded in config.yaml (not part of the hash)."""
    import importlib.metadata as md

    versions = {"harness": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "bitsandbytes", "datasets", "scipy", "rouge-score",
                "lm_eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_sha": sha, "command": sys.argv}


def write_config(d: Path, config: dict, extra: dict | None = None) -> None:
    write_yaml(d / "config.yaml", {**config, **(extra or {}), **provenance()})

