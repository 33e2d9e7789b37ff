"""Loading Hugging Face checkpoints (hub id or directory) the way the reference does (spec 2.1)."""

from __future__ import annotations

import os
from pathlib import Path

from harness import HarnessError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


def resolve_path(name_or_dir: str) -> str:
    """``tiny:<kind>`` -> the embedded model directory (built on first use); anything else unchanged."""
    if isinstance(name_or_dir, str) and name_or_dir.startswith("tiny:"):
        from harness.tiny import tiny_model_dir

        return str(tiny_model_dir(name_or_dir.split(":", 1)[1]))
    return str(name_or_dir)


def _explain(name: str, exc: Exception) -> HarnessError:
    local = Path(name).exists()
    if local:
        return HarnessError(f"cannot load model/tokenizer from {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    hint = " (the hub is offline: HF_HUB_OFFLINE=1 or no network; pass a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return HarnessError(f"cannot load '{name}'{hint}: {str(exc).splitlines()[0]}")


def load_tokenizer(name_or_dir: str, *, trust_remote_code: bool = False):
    """AutoTokenizer with the reference's fixes: eos := <|endoftext|> if missing, pad := eos if missing."""
    from transformers import AutoTokenizer

    name = resolve_path(name_or_dir)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _explain(name, exc) from None
    if tok.eos_token_id is None:
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_dir: str, *, dtype: str = "float32", trust_remote_code: bool = False, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    name = resolve_path(name_or_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype="auto" if dtype == "auto" else getattr(torch, DTYPES[dtype]),
                                                     trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _explain(name, exc) from None
    if device is not None:
        model.to(device)
    model.eval()
    return model
