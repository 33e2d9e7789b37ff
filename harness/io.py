"""Atomic file writes, safe YAML, config hashing. Every result and cache file goes through here."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=_default) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_default) + "\n" for r in rows))


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


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
