"""Atomic file writes, safe YAML, strict JSON, config hashing. Every result and cache file goes through here."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from harness import HarnessError


class WriteError(HarnessError, OSError):
    """A failed write in the user's words (a HarnessError: one line, exit 2); still an OSError, so callers
    that tolerate a failed write (a read-only cache) keep doing so."""


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename).

    An operating-system failure (read-only, full disk, a file where a directory should be) is a
    one-line HarnessError naming ``path``; the previous content of ``path`` is left as it was."""
    path = Path(path)
    try:
        _write_atomic(path, data)
    except WriteError:
        raise
    except OSError as exc:
        err = WriteError(os_error_message(exc, path))
        err.errno = exc.errno  # no filename: OSError would then print "[Errno N] ..." instead of the message
        raise err from exc


def _write_atomic(path: Path, data: bytes) -> None:
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp makes the file private (0600); results on a shared filesystem must stay readable
            # by colleagues, so give it the mode a plain open() would (0666 less the umask)
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@functools.cache
def _umask() -> int:
    # read once: os.umask can only be read by setting it, which must not race with other threads' writes
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Strict JSON: a NaN or infinity is refused (bare ``NaN`` is not JSON; callers write null and a reason)."""
    write_text(path, dumps_strict(obj, path, indent=indent, sort_keys=sort_keys) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(dumps_strict(r, path, indent=None) + "\n" for r in rows))


def dumps_strict(obj: Any, path, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=_default,
                          allow_nan=False)
    except ValueError as exc:
        raise HarnessError(f"{path}: refusing to write a non-finite number (NaN/Infinity) as JSON: {exc}") from None


def finite_or_none(v) -> tuple[Any, str | None]:
    """``(v, None)`` for a finite number or a non-number; ``(None, "nan"|"inf"|"-inf")`` otherwise."""
    if isinstance(v, float) and not math.isfinite(v):
        return None, "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v, None


# errno -> what the user reads; anything else keeps the system's wording
_OS_PROBLEMS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a file is in the way where a directory is expected",
    errno.EEXIST: "a file is in the way where a directory is expected",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_message(exc: OSError, path=None, action: str = "cannot write") -> str:
    """One line naming the path (the one the user gave when known) and the problem in plain words."""
    problem = _OS_PROBLEMS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    where = exc.filename if exc.filename is not None else path
    if path is not None and where is not None and Path(str(where)).name.endswith(".tmp"):
        where = path  # the temp file of an atomic write means nothing to the user
    if where is None:
        return f"{action}: {problem}" if action else problem
    return f"{action} {where}: {problem}" if action else f"{where}: {problem}"


def make_dirs(d: Path) -> None:
    """``mkdir -p``; a failure is a WriteError naming the component at fault (e.g. a file in the way)."""
    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cause = exc
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            blocker = next((p for p in [d, *d.parents] if p.exists() and not p.is_dir()), d)
            cause = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker))
        err = WriteError(os_error_message(cause, d))
        err.errno = cause.errno
        raise err from exc


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


MAX_YAML_NODES = 10_000  # after alias expansion; the largest shipped file (registry.yaml) has ~230
# the tags safe data may carry (plain maps, lists, scalars); explicit tags outside them are refused
_YAML_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null",
                                                   "timestamp", "merge")}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with compose-level checks: a bounded size after alias expansion (no "billion laughs"),
    no recursive aliases, only the standard data tags, no duplicate keys in a mapping."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):  # an alias: its node was checked where it was defined
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if node.tag not in _YAML_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.composer.ComposerError(None, None, f"tag '{tag}' is not allowed (safe YAML: plain maps, "
                                              "lists, strings, numbers, booleans)", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple, Any] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag.endswith(":merge"):
                    continue
                ident = (key.tag, key.value)
                if ident in seen:
                    raise yaml.composer.ComposerError(
                        None, None, f"duplicate key '{key.value}' (first at line {seen[ident].line + 1})",
                        key.start_mark)
                seen[ident] = key.start_mark
        return node


def _expanded_size(node, sizes: dict[int, int], open_: set[int]) -> int:
    """Node count with every alias expanded; memoised per node, so the walk itself stays linear."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "recursive alias (a node that contains itself)", node.start_mark)
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if total > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(None, None, f"aliases expand to more than {MAX_YAML_NODES} nodes "
                                          "(an alias bomb?)", node.start_mark)
    sizes[key] = total
    return total


def read_yaml(path: Path, *, what: str = "YAML file") -> Any:
    """The one YAML loader of the harness (tasks, templates, registry.yaml): safe, strict, and every
    problem is one HarnessError line ``<path>: line N invalid YAML: <problem>``."""
    try:
        with open(path, encoding="utf-8") as fh:
            loader = _StrictLoader(fh)
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise HarnessError(f"{path}:{where} invalid YAML: {problem}") from None
    except RecursionError:
        raise HarnessError(f"{path}: invalid YAML: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: invalid YAML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def read_jsonl(path: Path) -> list[dict]:
    """The one JSONL reader: blank lines skipped, a bad line is an error naming the file and line."""
    from harness import HarnessError

    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise HarnessError(f"{path}:{n}: invalid JSON line ({exc.msg})") from None
    return rows


def config_hash(obj: Any, n: int = 8) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True):
    """The one inter-process lock (flock on ``path``); yields False instead of waiting when ``wait`` is
    False and another process holds it. Released when the holder exits, even by SIGKILL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
