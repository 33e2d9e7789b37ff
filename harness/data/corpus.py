"""MUSE data for unlearning runs: the raw corpora, and the fallback of the embedded tiny profile.

MUSE unlearns on the raw forget corpus with the raw ``retain1`` corpus as retain set (spec 2.8).
The bundled MUSE-News copy holds raw/forget but not raw/retain1 (too large to ship), so with the
embedded ``tiny`` models, and only then, a run whose retain corpus is not available uses the bundled
privleak *retain* texts instead and says so. Those texts are what the tiny models were built from,
so the run stays meaningful; for the published models a missing split is an error that names it
and how to supply it.
"""

from __future__ import annotations

from pathlib import Path

from harness import HarnessError
from harness.tasks import DataSpec, Task

# hub dataset -> retain-side texts the tiny models are built from (bundled)
TINY_RETAIN_FALLBACK = {"muse-bench/MUSE-News": DataSpec("muse-bench/MUSE-News", "privleak", "retain")}


def is_muse(task: Task) -> bool:
    return task.benchmark == "MUSE"


def is_tiny_model(path: str | Path | None) -> bool:
    """Whether ``path`` is an embedded tiny checkpoint (``tiny:<kind>`` or a directory in the tiny cache)."""
    if not path:
        return False
    s = str(path)
    if s.startswith("tiny:"):
        return True
    from harness.paths import harness_home

    try:
        Path(s).resolve().relative_to((harness_home() / "tiny").resolve())
    except (ValueError, OSError):
        return False
    return True


def fallback_spec(task: Task, role: str, data_dir=None, *, tiny: bool) -> DataSpec | None:
    """The split that replaces ``role`` in a run, or None when the declared split is used."""
    from harness.data.splits import local_path, missing_splits

    if not (tiny and is_muse(task) and role == "retain"):
        return None
    spec = task.data_spec(role)
    if not missing_splits({role: spec}, data_dir):
        return None
    fb = TINY_RETAIN_FALLBACK.get(spec.path)
    if fb is None or local_path(fb, data_dir) is None:
        return None
    return fb


def run_data_specs(task: Task, data_dir=None, *, tiny: bool) -> dict[str, DataSpec]:
    """The task's data roles with the tiny fallback applied (what a run will actually read)."""
    return {role: fallback_spec(task, role, data_dir, tiny=tiny) or spec for role, spec in task.data.items()}


def corpus_rows(task: Task, role: str, data_dir=None, *, tiny: bool) -> list[dict]:
    """Rows of the raw corpus ``role`` (forget / retain) for unlearning, with the tiny fallback."""
    from harness.data.splits import load_split
    from harness.hub import notice_once

    fb = fallback_spec(task, role, data_dir, tiny=tiny)
    if fb is not None:
        notice_once(f"muse-tiny-retain:{task.name}",
                    f"task '{task.name}': {task.data_spec(role).label()} is not bundled; the embedded tiny model "
                    f"uses the bundled {fb.label()} texts as its retain corpus (those it was built from). "
                    "For the published setup supply raw/retain1 with --data-dir DIR (raw/retain1.jsonl) or the hub.")
        return load_split(fb, data_dir)
    return load_split(task.data_spec(role), data_dir)


def missing_data_error(task: Task, data_dir=None, *, tiny: bool = False) -> HarnessError | None:
    """The fail-fast error for splits that cannot be found offline (None when everything is there)."""
    from harness.data.splits import missing_splits

    missing = missing_splits(run_data_specs(task, data_dir, tiny=tiny), data_dir)
    if not missing:
        return None
    where = f" (looked in --data-dir {data_dir} and the bundled data)" if data_dir else " (only MUSE-News pieces are bundled)"
    return HarnessError(
        f"task '{task.name}': data not available offline: {', '.join(missing)}{where}; supply them with "
        "--data-dir DIR holding <subset>/<split>.jsonl (e.g. raw/forget.jsonl, knowmem/forget_qa.jsonl) "
        "or run with hub access")


def text_key(task: Task, rows: list[dict], role: str) -> str:
    key = task.field_name("text")
    if rows and key not in rows[0]:
        raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' has no field '{key}' "
                           f"(fields: {', '.join(rows[0])}); fix prompt.text")
    return key
