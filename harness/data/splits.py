"""Dataset splits: the hub first, the bundled copy when offline, ``--data-dir`` when given.

A split is returned as a list of row dicts in the original order (the row number is the
``index`` that metrics and the open-unlearning export use).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from harness import HarnessError
from harness.hub import hub_available, notice_once
from harness.paths import bundled_dir
from harness.tasks import DataSpec

# hub dataset id -> folder under harness/bundled (TOFU: <name>.jsonl; MUSE: <name>/<split>.jsonl)
BUNDLED = {"locuslab/TOFU": "tofu", "muse-bench/MUSE-News": "muse_news", "open-unlearning/idk": "tofu/idk.jsonl"}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise HarnessError(f"{path}:{n}: invalid JSON line ({exc.msg})") from None
    return rows


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
    return _read_lines(path) if spec.path == "open-unlearning/idk" else _read_jsonl(path)


def _from_hub(spec: DataSpec) -> list[dict]:
    import datasets

    if spec.path == "open-unlearning/idk":
        ds = datasets.load_dataset(spec.path, data_files="*.jsonl", split="train")
    else:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    return [dict(r) for r in ds]


def data_dir_file(spec: DataSpec, data_dir) -> Path | None:
    """The file of ``spec`` in ``--data-dir`` (never the bundled copy), or None."""
    if not data_dir:
        return None
    return next((c for c in _candidates(Path(data_dir), spec) if c.is_file()), None)


def _expected(root: Path, spec: DataSpec) -> Path:
    # the layout messages suggest: TOFU's flat <name>.jsonl, MUSE's <subset>/<split>.jsonl
    c = _candidates(root, spec)
    return c[-1] if spec.split == "train" else c[0]


def source_file(spec: DataSpec, data_dir=None) -> Path | None:
    """The local file a load of ``spec`` reads (None: the hub). Mirrors ``_load``'s order."""
    own = data_dir_file(spec, data_dir)
    if own is not None:
        return own
    return None if hub_available() else local_path(spec, data_dir)


def check_data_dir(specs: dict[str, DataSpec], data_dir, *, what: str) -> None:
    """An explicit ``--data-dir`` must exist and supply at least one of ``specs``; each split it does not
    hold comes from the hub or the bundled copy, and a notice names it (never a silent substitution).
    ``what`` names the consumer in messages (e.g. "task 'tofu_forget01'")."""
    if not data_dir:
        return
    root = Path(data_dir)
    if not root.is_dir():
        raise HarnessError(f"--data-dir {data_dir}: no such directory")
    own = {role: data_dir_file(spec, root) for role, spec in specs.items()}
    if specs and not any(own.values()):
        expected = sorted({str(_expected(root, spec)) for spec in specs.values()})
        shown = ", ".join(expected[:4]) + (f" and {len(expected) - 4} more" if len(expected) > 4 else "")
        raise HarnessError(f"--data-dir {data_dir} holds none of the splits {what} reads (expected e.g. {shown})")
    elsewhere = [f"{role} ({_expected(root, spec).relative_to(root)})" for role, spec in specs.items()
                 if own[role] is None]
    if elsewhere:
        where = "the hub" if hub_available() else "the bundled copies"
        notice_once(f"data-dir-missing:{root}:{what}",
                    f"--data-dir {data_dir} holds no file for {what} data role(s) {', '.join(elsewhere)}: "
                    f"using {where} of those splits")


def data_fingerprints(specs: dict[str, DataSpec], data_dir=None) -> dict[str, str]:
    """role -> content fingerprint of the file it reads (``hub:<label>`` for a hub split)."""
    from harness.fingerprint import fingerprint

    out = {}
    for role, spec in sorted(specs.items()):
        f = source_file(spec, data_dir)
        out[role] = fingerprint(f) if f is not None else f"hub:{spec.label()}"
    return out


@lru_cache(maxsize=64)
def _load(spec: DataSpec, data_dir: str | None, stamp: tuple | None = None) -> tuple[dict, ...]:
    # ``stamp`` (size, mtime_ns of the --data-dir file) keys the cache: a file rewritten in place is reread
    own = data_dir_file(spec, data_dir)
    if own is not None:
        return tuple(_rows_from_file(own, spec))
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
    own = data_dir_file(spec, data_dir)
    stamp = (own.stat().st_size, own.stat().st_mtime_ns) if own is not None else None
    return list(_load(spec, str(data_dir) if data_dir else None, stamp))


def missing_splits(specs: dict[str, DataSpec], data_dir=None) -> list[str]:
    """Roles whose data cannot be found offline (used to fail fast before any work)."""
    if hub_available():
        return []
    return [f"{role} ({spec.label()})" for role, spec in specs.items() if local_path(spec, data_dir) is None]
