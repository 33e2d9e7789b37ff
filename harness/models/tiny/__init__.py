"""The embedded default: tiny Llama-architecture models the harness builds itself, on CPU, in minutes.

Everything derives deterministically from a seed and the bundled text. Every checkpoint is cached
under ``$HARNESS_HOME/tiny/<size>-<fingerprint>/<kind>`` and built lazily, only when a task needs it;
``HARNESS_TINY_SIZE=test`` selects the sub-1M-parameter test build. Only the profile layer
(``harness.models.profiles``) asks for a tiny checkpoint: loading a model never builds one.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from harness import HarnessError
from harness.io import file_lock, write_json
from harness.models.tiny import muse, tofu
from harness.models.tiny.build import (
    SIZES,
    TINY_TEMPLATE,
    build_base_model,
    build_tokenizer,
    complete,
    current_size,
    root,
    write_template,
)

log = logging.getLogger("harness")

# kind -> builder(size, parent_dir) -> (model, tokenizer); a builder's ``recipe_version`` is part of
# the cache marker, so bumping it rebuilds that kind
KINDS = {**tofu.KINDS, **muse.KINDS}

__all__ = ["KINDS", "SIZES", "TINY_TEMPLATE", "current_size", "root", "tiny_model_dir"]


def _version(kind: str):
    return getattr(KINDS.get(kind), "recipe_version", None)


def tiny_model_dir(kind: str, *, size: str | None = None) -> Path:
    """Directory of the tiny checkpoint ``kind`` (HF format, tokenizer included), built if missing."""
    if kind != "base" and kind not in KINDS:
        raise HarnessError(f"unknown tiny model kind '{kind}'; valid: base, {', '.join(KINDS)}")
    size_name = current_size(size)
    spec = SIZES[size_name]
    base = root(size_name)
    out = base / kind
    if complete(out, _version(kind)):
        write_template(out)
        return out
    with file_lock(base / f".{kind}.lock"):
        if complete(out, _version(kind)):
            return out
        if out.exists():
            log.warning("tiny model cache %s is stale, incomplete or corrupt: rebuilding it", out)
            shutil.rmtree(out)
        if kind == "base":
            log.info("building tiny tokenizer and base model (%s size)", size_name)
            tok = build_tokenizer(spec)
            model = build_base_model(spec, tok)
        else:
            model, tok = KINDS[kind](spec, lambda k: tiny_model_dir(k, size=size_name))
        tmp = base / f".{kind}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_template(tmp)
        write_json(tmp / ".complete", {"kind": kind, "size": size_name, "recipe_version": _version(kind),
                                       **asdict(spec)})
        os.replace(tmp, out)
    return out
