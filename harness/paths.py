"""Where things live: the built-in root, bundled data, and the cache ($HARNESS_HOME)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

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
    home.mkdir(parents=True, exist_ok=True)
    return home
