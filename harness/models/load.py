"""Loading Hugging Face checkpoints (hub id or directory) the way the reference does (spec 2.1).

Only loading: which checkpoint a task uses is decided in ``harness.models.profiles``."""

from __future__ import annotations

import os
from pathlib import Path

from harness import HarnessError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


# A checkpoint directory may carry its prompt template (template_args keys) under this name.
CHECKPOINT_TEMPLATE = "harness_template.yaml"


def _checked(name_or_dir) -> str:
    name = str(name_or_dir)
    if name.startswith("tiny:"):
        # the profile layer turns tiny:<kind> into a directory (and builds it); a loader never trains
        raise HarnessError(f"'{name}' is an embedded tiny model name, not a checkpoint: resolve it with "
                           "harness.models.profiles.checkpoint_path first")
    return name


def _explain(name: str, exc: Exception) -> HarnessError:
    local = Path(name).exists()
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc):
        return HarnessError(f"{name} contains custom model code, which runs only when you allow it: "
                            "pass --trust-remote-code if you trust its source")
    if local:
        from harness.paths import harness_home

        if Path(name).resolve().is_relative_to(harness_home().resolve()):
            return HarnessError(f"the cached model {name} is corrupt ({type(exc).__name__}: {first}); "
                                "delete that directory and rerun to rebuild it")
        return HarnessError(f"cannot load model/tokenizer from {name}: {type(exc).__name__}: {first}")
    hint = " (the hub is offline: HF_HUB_OFFLINE=1 or no network; pass a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return HarnessError(f"cannot load '{name}'{hint}: {str(exc).splitlines()[0]}")


def load_tokenizer(name_or_dir: str, *, trust_remote_code: bool = False):
    """AutoTokenizer with the reference's fixes: eos := <|endoftext|> if missing, pad := eos if missing."""
    from transformers import AutoTokenizer

    name = _checked(name_or_dir)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _explain(name, exc) from None
    if tok.eos_token_id is None:
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_dir: str, *, dtype: str = "float32", trust_remote_code: bool = False, device=None,
               adapter: str | None = None, merge_adapter: bool = False, load_in_4bit: bool = False):
    """A causal LM from a hub id or directory, in eval mode.

    ``adapter``: a peft adapter directory applied on top (scored as a ``PeftModel``; ``merge_adapter``
    merges it into the weights, e.g. to train from it). ``load_in_4bit``: QLoRA's nf4 base (CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    name = _checked(name_or_dir)
    kwargs = {}
    if load_in_4bit:
        kwargs = _four_bit(dtype)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name, dtype="auto" if dtype == "auto" else getattr(torch, DTYPES[dtype]),
            trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
    except Exception as exc:
        raise _explain(name, exc) from None
    check_weights(model, info, name)
    if device is not None and not load_in_4bit:
        model.to(device)
    if adapter is not None:
        model = _with_adapter(model, adapter, merge_adapter)
    model.eval()
    return model


def _four_bit(dtype: str) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise HarnessError("--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers train only there")
    compute = torch.float16 if DTYPES.get(dtype) == "float16" else torch.bfloat16
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
            "device_map": {"": torch.cuda.current_device()}}


def _with_adapter(model, adapter: str, merge: bool):
    try:
        from peft import PeftModel
    except ImportError:
        raise HarnessError(f"{adapter} is a peft adapter: loading it needs the 'peft' package (pip install peft)") from None
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except Exception as exc:
        raise HarnessError(f"cannot apply the adapter {adapter} to its base model: {type(exc).__name__}: "
                           f"{(str(exc).strip().splitlines() or [''])[0]}") from None
    return model.merge_and_unload() if merge else model


def check_weights(model, info: dict, name: str) -> None:
    """Weights the checkpoint does not hold would be randomly initialised and scored as if trained.
    Tied weights (lm_head = embed_tokens) are not reported missing by transformers; keys an
    architecture declares optional (``_keys_to_ignore_on_load_missing``) are legitimately absent."""
    import re

    optional = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = sorted(k for k in (info or {}).get("missing_keys") or () if not any(p.search(k) for p in optional))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise HarnessError(f"{name}: the checkpoint's weights do not cover the model: {len(missing)} tensor(s) "
                           f"missing ({shown}); they would be scored with random values. Is the checkpoint "
                           "complete (all weight shards) and of this architecture?")


def context_length(model) -> int | None:
    """The longest sequence the checkpoint was built for (``max_position_embeddings`` / ``n_positions``)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_checkpoint(model, tokenizer, name: str) -> None:
    """A tokenizer that can emit ids past the model's embedding table would crash mid-run with an
    index error; say so up front, naming both sizes."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        return
    ids = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None]
    needed = max([len(tokenizer), *(i + 1 for i in ids)])
    if needed > rows:
        raise HarnessError(f"{name}: the tokenizer has {needed} token ids but the model's embedding has {rows} rows "
                           "(tokenizer and weights do not belong together); use the checkpoint's own tokenizer")


def learned_positions(model) -> str | None:
    """The name of the model's learned absolute position table (GPT-2's ``wpe``, OPT's ``embed_positions``),
    None when it has none (rotary or ALiBi positions: nothing indexes a table by position)."""
    import torch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1].lower()
        if isinstance(mod, torch.nn.Embedding) and mod is not emb and (last == "wpe" or "pos" in last):
            return name
    return None


def check_lengths(model, lengths: list[int], name: str, *, what: str) -> None:
    """Rows longer than the checkpoint's declared context.

    With a learned absolute position table they would index past it (a crash): a one-line error naming
    ``--max-length``. Rotary (and other table-free) models are scored as the reference scores them
    (e.g. MUSE privleak rows of bos + 2048 tokens on a 2048-context model); that is said once."""
    ctx = context_length(model)
    if ctx is None or not lengths:
        return
    long = [i for i, n in enumerate(lengths) if n > ctx]
    if not long:
        return
    table = learned_positions(model)
    if table is None:
        from harness.hub import notice_once

        notice_once(f"long-rows:{name}:{ctx}",
                    f"{name} declares a context of {ctx} tokens; rows of up to {max(lengths)} tokens ({what}) use "
                    f"positions beyond it, as the reference does (it has no position table; --max-length {ctx - 1} "
                    "truncates them instead)")
        return
    shown = ", ".join(map(str, long[:5])) + (f" and {len(long) - 5} more" if len(long) > 5 else "")
    raise HarnessError(f"{name} has a context of {ctx} tokens but {len(long)} row(s) of {what} are longer "
                       f"(rows {shown}; up to {max(lengths)} tokens): pass --max-length {ctx - 1} to truncate them "
                       f"(the end-of-sequence token is appended after truncation; its learned position table "
                       f"'{table}' has {ctx} rows)")
