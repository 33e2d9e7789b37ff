"""The Hugging Face hub is probed at most once per process; after a failed probe all is local."""

from __future__ import annotations

import logging
import os
import socket
from functools import cache

log = logging.getLogger("harness")
_noticed: set[str] = set()


def offline_env() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false", "False")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@cache
def hub_available() -> bool:
    """True when the hub answers a TCP connect within 3 s (never tried under HF_HUB_OFFLINE=1)."""
    if offline_env():
        return False
    netloc = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = netloc.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=3):
            return True
    except (OSError, ValueError):
        # Later loads must not spend ~50 s each retrying name resolution.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        notice_once("offline", f"Hugging Face hub ({netloc}) not reachable: working offline with bundled data and local files")
        return False


def notice_once(key: str, message: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        log.warning(message)
