"""Dataset splits: the hub first, the bundled copy when offline, ``--data-dir`` when given.

A split is returned as a list of row dicts in the original order (the row number is the
``index`` that metrics and the open-unlearning export use).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from harness import HarnessError
from harness.hub import hub_available, notice_once
from harness.io import read_jsonl
from harness.paths import bundled_dir
from harness.tasks import DataSpec

# hub dataset id -> folder under harness/bundled (TOFU: <name>.jsonl; MUSE: <name>/<split>.jsonl)
BUNDLED = {"locuslab/TOFU": "tofu", "muse-bench/MUSE-News": "muse_news", "open-unlearning/idk": "tofu/idk.jsonl"}


def _read_lines(path: Path) -> list[dict]:
    # The idk list is plain text, one answer per line (read like the reference's readlines()).
    with open(path, encoding="utf-8") as fh:
        return [{"text": line.strip()} for line in fh if line.strip()]


def _candidates(root: Path, spec: DataSpec) -> list[Path]:
    name, split = spec.name, spec.split
    if name:
        return [root / name / f"{split}.jsonl", root / f"{name}.jsonl"]
    return [root / f"{split}.jsonl"]


def local_path(spec: DataSpec, data_dir: str | Path | None = None) -> Path | None:
    if data_dir:
        for c in _candidates(Path(data_dir), spec):
            if c.is_file():
                return c
    sub = BUNDLED.get(spec.path)
    if sub is None:
        return None
    target = bundled_dir() / sub
    if target.suffix == ".jsonl":
        return target if target.is_file() else None
    for c in _candidates(target, spec):
        if c.is_file():
            return c
    return None


def _rows_from_file(path: Path, spec: DataSpec) -> list[dict]:
    return _read_lines(path) if spec.path == "open-unlearning/idk" else read_jsonl(path)


def _from_hub(spec: DataSpec) -> list[dict]:
    import datasets

    if spec.path == "open-unlearning/idk":
        ds = datasets.load_dataset(spec.path, data_files="*.jsonl", split="train")
    else:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    return [dict(r) for r in ds]


@lru_cache(maxsize=64)
def _load(spec: DataSpec, data_dir: str | None) -> tuple[dict, ...]:
    if data_dir:
        p = local_path(spec, data_dir)
        if p is not None and not str(p).startswith(str(bundled_dir())):
            return tuple(_rows_from_file(p, spec))
    if hub_available():
        try:
            return tuple(_from_hub(spec))
        except Exception as exc:  # fall back to the bundled copy, but say why
            notice_once(f"hub-data:{spec.label()}", f"could not load {spec.label()} from the hub ({type(exc).__name__}); trying the bundled copy")
    p = local_path(spec, data_dir)
    if p is None:
        where = f"--data-dir (as <name>/<split>.jsonl, here {spec.name}/{spec.split}.jsonl)" if spec.name else "--data-dir"
        raise HarnessError(
            f"dataset split {spec.label()} is not available offline and is not bundled; "
            f"supply it with {where} or run with hub access")
    notice_once("offline", "Hugging Face hub not reachable (or HF_HUB_OFFLINE=1): using bundled/local data copies")
    return tuple(_rows_from_file(p, spec))


def load_split(spec: DataSpec, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of one split (a fresh list of the cached rows; do not mutate the dicts)."""
    return list(_load(spec, str(data_dir) if data_dir else None))


def missing_splits(specs: dict[str, DataSpec], data_dir=None) -> list[str]:
    """Roles whose data cannot be found offline (used to fail fast before any work)."""
    if hub_available():
        return []
    return [f"{role} ({spec.label()})" for role, spec in specs.items() if local_path(spec, data_dir) is None]
