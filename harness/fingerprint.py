"""Content fingerprints of local inputs (checkpoints, tokenizers, data files, templates, reference logs).

A run's identity must change whenever the bytes it reads change, also when a file is rewritten in place
at the same path. Hashing a multi-GB checkpoint on every run would be slow, so each file's sha256 is
cached under ``$HARNESS_HOME/fingerprints/file_hashes.json`` keyed by (resolved path, size, mtime_ns):
a rewrite changes the key, an untouched file is read once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.io import write_json
from harness.paths import harness_home

# never part of what a loader reads: our locks, temp files, the backups of an overwritten run
_SKIP_SUFFIXES = (".lock", ".tmp")


def _index_file() -> Path:
    return harness_home() / "fingerprints" / "file_hashes.json"


def _read_index() -> dict:
    try:
        return json.loads(_index_file().read_text())
    except (OSError, ValueError):
        return {}


def _digest(f: Path, index: dict) -> tuple[str, bool]:
    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    d = index.get(key)
    if d is not None:
        return d, False
    h = hashlib.sha256()
    with open(f, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            h.update(block)
    index[key] = h.hexdigest()
    return index[key], True


def _save(index: dict) -> None:
    # several processes may race here: the last writer wins and a lost entry only costs a rehash
    merged = {**_read_index(), **index}
    try:
        write_json(_index_file(), merged, indent=None)
    except OSError:
        pass  # a read-only cache only costs a rehash next time


def loadable_files(directory: Path) -> list[Path]:
    """The files a Hugging Face loader may read from ``directory``: its top-level files (weights, configs,
    tokenizer files, the prompt template), not hidden files, locks or subdirectories such as trainer
    checkpoints or the backup of an overwritten run."""
    return sorted(f for f in Path(directory).iterdir()
                  if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_SKIP_SUFFIXES))


def fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a directory's loadable files (names and contents)."""
    p = Path(path).expanduser()
    index = _read_index()
    changed = False
    if p.is_dir():
        h = hashlib.sha256()
        for f in loadable_files(p):
            d, new = _digest(f, index)
            changed |= new
            h.update(f"{f.name}\0{d}\n".encode())
        out = h.hexdigest()
    else:
        out, changed = _digest(p, index)
    if changed:
        _save(index)
    return f"sha256:{out}"
