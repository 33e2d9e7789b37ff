"""Dataset splits: ``--data-dir`` when it holds the split, else the hub, else the bundled copy.

A split is returned as a list of row dicts in the original order (the row number is the
``index`` that metrics and the open-unlearning export use). ``harness run`` decides the source of
every split once, before the run hash (``resolve_source``); a ``ResolvedSpec`` is then read from
exactly that source, never from another one behind the run's back.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from harness import HarnessError, hub
from harness.hub import notice_once
from harness.io import read_jsonl
from harness.paths import bundled_dir
from harness.tasks import TEXT_BUILDER, DataSpec, ResolvedSpec

# hub dataset id -> folder under harness/bundled (TOFU: <name>.jsonl; MUSE: <name>/<split>.jsonl)
BUNDLED = {"locuslab/TOFU": "tofu", "muse-bench/MUSE-News": "muse_news", "open-unlearning/idk": "tofu/idk.jsonl"}


def _read_lines(path: Path) -> list[dict]:
    # The idk list is plain text, one answer per line (read like the reference's readlines()).
    with open(path, encoding="utf-8") as fh:
        return [{"text": line.strip()} for line in fh if line.strip()]


def _text_rows(path: Path) -> list[dict]:
    """The HF ``text`` builder (``load_dataset("text", data_files=...)``, sample_by line): every line, empty
    ones too, without its line break, is one row ``{"text": line}``; a JSONL file's raw JSON lines are texts
    as they stand (the reference reads WMDP's corpora so, spec 2.8)."""
    with open(path, encoding="utf-8") as fh:
        return [{"text": line.rstrip("\n")} for line in fh]


def is_local_only(spec: DataSpec) -> bool:
    """A split read only from --data-dir (the text builder over a local file), never the hub or bundled."""
    return spec.path == TEXT_BUILDER


def _candidates(root: Path, spec: DataSpec) -> list[Path]:
    name, split = spec.name, spec.split
    if name:
        return [root / name / f"{split}.jsonl", root / f"{name}.jsonl"]
    return [root / f"{split}.jsonl"]


def _data_dir_path(spec: DataSpec, data_dir) -> Path | None:
    if data_dir:
        for c in _candidates(Path(data_dir), spec):
            if c.is_file():
                return c
    return None


def local_path(spec: DataSpec, data_dir: str | Path | None = None) -> Path | None:
    return _data_dir_path(spec, data_dir) or _bundled_path(spec)


def _bundled_path(spec: DataSpec) -> Path | None:
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
    if is_local_only(spec):
        return _text_rows(path)
    return _read_lines(path) if spec.path == "open-unlearning/idk" else read_jsonl(path)


def _from_hub(spec: DataSpec) -> list[dict]:
    import datasets

    if spec.path == "open-unlearning/idk":
        ds = datasets.load_dataset(spec.path, data_files="*.jsonl", split="train")
    else:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    return [dict(r) for r in ds]


def resolve_source(spec: DataSpec, data_dir: str | Path | None = None) -> str | None:
    """Where a run reads ``spec``: ``data_dir:<file>`` (relative to --data-dir), ``hub``, or
    ``bundled:<file>`` (relative to harness/bundled); None when it is nowhere to be had."""
    local = _data_dir_path(spec, data_dir)
    if local is not None and not str(local).startswith(str(bundled_dir())):
        return f"data_dir:{local.relative_to(Path(data_dir)).as_posix()}"
    if is_local_only(spec):
        return None
    if hub.hub_available():
        return "hub"
    bundled = _bundled_path(spec)
    return f"bundled:{bundled.relative_to(bundled_dir()).as_posix()}" if bundled is not None else None


def resolved(spec: DataSpec, data_dir=None) -> DataSpec:
    """``spec`` pinned to its source (unchanged when it has none: the run's data check reports it)."""
    if isinstance(spec, ResolvedSpec):
        return spec
    source = resolve_source(spec, data_dir)
    return ResolvedSpec(spec.path, spec.name, spec.split, source=source) if source else spec


def _load_resolved(spec: ResolvedSpec, data_dir: str | None) -> tuple[dict, ...]:
    kind, _, rel = spec.source.partition(":")
    if kind == "hub":
        try:
            return tuple(_from_hub(spec))
        except Exception as exc:
            raise HarnessError(
                f"dataset split {spec.label()}: this run was set up to read it from the hub, which failed "
                f"({type(exc).__name__}); rerun when the hub is back, or offline (HF_HUB_OFFLINE=1) to use "
                "the bundled/--data-dir copy in a run directory of its own") from None
    if kind not in ("bundled", "data_dir") or (kind == "data_dir" and not data_dir):
        raise HarnessError(f"dataset split {spec.label()}: source {spec.source!r} cannot be read here "
                           "(expected hub, bundled:<file> or data_dir:<file> with --data-dir)")
    path = (bundled_dir() if kind == "bundled" else Path(data_dir)) / rel
    if not path.is_file():
        raise HarnessError(f"dataset split {spec.label()}: {path} (source {spec.source}) is gone")
    return tuple(_rows_from_file(path, spec))


def source_file(spec: DataSpec, data_dir=None) -> Path | None:
    """The local file a load of ``spec`` reads (None: the hub, or nowhere)."""
    source = spec.source if isinstance(spec, ResolvedSpec) else resolve_source(spec, data_dir)
    kind, _, rel = (source or "").partition(":")
    if kind == "data_dir" and data_dir:
        return Path(data_dir) / rel
    if kind == "bundled":
        return bundled_dir() / rel
    return None


def _expected(root: Path, spec: DataSpec) -> Path:
    # the layout messages suggest: TOFU's flat <name>.jsonl, MUSE's <subset>/<split>.jsonl
    c = _candidates(root, spec)
    return c[-1] if spec.split == "train" else c[0]


def check_data_dir(specs: dict[str, DataSpec], data_dir, *, what: str) -> None:
    """An explicit ``--data-dir`` must exist and supply at least one of ``specs``; each split it does not
    hold comes from the hub or the bundled copy, and one notice names them (never a silent substitution).
    ``what`` names the consumer in messages (e.g. "task 'tofu_forget01'")."""
    if not data_dir:
        return
    root = Path(data_dir)
    if not root.is_dir():
        raise HarnessError(f"--data-dir {data_dir}: no such directory")
    own = {role: _data_dir_path(spec, root) for role, spec in specs.items()}
    if specs and not any(own.values()):
        expected = sorted({str(_expected(root, spec)) for spec in specs.values()})
        shown = ", ".join(expected[:4]) + (f" and {len(expected) - 4} more" if len(expected) > 4 else "")
        raise HarnessError(f"--data-dir {data_dir} holds none of the splits {what} reads (expected e.g. {shown})")
    elsewhere = [f"{role} ({_expected(root, spec).relative_to(root)})" for role, spec in specs.items()
                 if own[role] is None]
    if elsewhere:
        where = "the hub" if hub.hub_available() else "the bundled copies"
        notice_once(f"data-dir-missing:{root}:{what}",
                    f"--data-dir {data_dir} holds no file for {what} data role(s) {', '.join(elsewhere)}: "
                    f"using {where} of those splits")


def data_fingerprints(specs: dict[str, DataSpec], data_dir=None) -> dict[str, str]:
    """role -> content fingerprint of the file it reads (``hub:<label>`` for a hub split)."""
    from harness.fingerprint import fingerprint

    out = {}
    for role, spec in sorted(specs.items()):
        f = source_file(spec, data_dir)
        out[role] = fingerprint(f) if f is not None and f.is_file() else f"hub:{spec.label()}"
    return out


@lru_cache(maxsize=64)
def _load(spec: DataSpec, data_dir: str | None, stamp: tuple | None = None) -> tuple[dict, ...]:
    # ``stamp`` (size, mtime_ns of the --data-dir file) keys the cache: a file rewritten in place is reread
    if isinstance(spec, ResolvedSpec):
        return _load_resolved(spec, data_dir)
    if data_dir:
        p = local_path(spec, data_dir)
        if p is not None and not str(p).startswith(str(bundled_dir())):
            return tuple(_rows_from_file(p, spec))
    if is_local_only(spec):
        raise HarnessError(f"dataset split {spec.label()} is a local text file: supply it with --data-dir DIR "
                           f"holding {spec.name}.jsonl")
    if hub.hub_available():
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
    own = _data_dir_path(spec, data_dir)
    st = own.stat() if own is not None else None
    return list(_load(spec, str(data_dir) if data_dir else None, (st.st_size, st.st_mtime_ns) if st else None))


def missing_splits(specs: dict[str, DataSpec], data_dir=None) -> list[str]:
    """Roles whose data cannot be found (used to fail fast before any work); a resolved spec is found."""
    return [f"{role} ({spec.label()})" for role, spec in specs.items()
            if not isinstance(spec, ResolvedSpec) and resolve_source(spec, data_dir) is None]
