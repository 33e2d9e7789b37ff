"""Where things live: the built-in root, bundled data, and the cache ($HARNESS_HOME)."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

from harness import HarnessError
from harness.io import WriteError, make_dirs

PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def builtin_root() -> Path:
    """Directory holding ``registry.yaml``, ``tasks/`` and ``methods/``.

    In a wheel they are force-included under ``harness/_builtin``; in a checkout (editable
    install) they sit at the repository root next to the package.
    """
    inside = PACKAGE_DIR / "_builtin"
    if (inside / "registry.yaml").is_file():
        return inside
    return PACKAGE_DIR.parent


def bundled_dir() -> Path:
    return PACKAGE_DIR / "bundled"


def harness_home() -> Path:
    home = Path(os.environ.get("HARNESS_HOME") or Path.home() / ".cache" / "unlearn-harness")
    try:
        make_dirs(home)
    except WriteError as exc:
        raise HarnessError(f"$HARNESS_HOME: {exc}") from None
    return home


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def safe_name(value, field: str) -> str:
    """``value`` if it can be one path component under ``-o`` / ``$HARNESS_HOME``: letters, digits and
    ``._-``, no leading dot (so never ``.``, ``..`` or a hidden file), no separator; else a one-line
    HarnessError naming ``field``."""
    if isinstance(value, str) and len(value) <= 200 and _SAFE_NAME.fullmatch(value):
        return value
    raise HarnessError(f"{field}: {value!r} is not a safe name: use letters, digits and '._-' "
                       "(not starting with '.'), at most 200 characters; it names a results directory")
