"""What every tiny build shares: sizes, the tokenizer and base model, the cache layout and its locks.

The embedded default is a tiny Llama-architecture model the harness builds itself.

Everything derives deterministically from a seed and the bundled text: a byte-level BPE
tokenizer trained on the bundled TOFU (and MUSE-News) text, a randomly initialised Llama model,
then finetuned checkpoints. To stay within minutes on CPU the retain model is trained first and
the target continues it on ``full`` (the retain model never sees the forget split). Every
checkpoint is cached under ``$HARNESS_HOME/tiny/<size>-<fingerprint>/<kind>`` and built lazily,
only when a task needs it. ``HARNESS_TINY_SIZE=test`` selects the sub-1M-parameter test build.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import HarnessError
from harness.data.encode import Template
from harness.io import config_hash, read_jsonl
from harness.paths import bundled_dir, harness_home

log = logging.getLogger("harness")

SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TINY_TEMPLATE = Template(apply_chat_template=False, user_start_tag="<|user|>", user_end_tag="",
                         asst_start_tag="<|assistant|>", asst_end_tag="\n")
BUILD_VERSION = 1  # bump when the recipe changes: invalidates cached tiny models


@dataclass(frozen=True)
class TinySize:
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    retain_rows: int | None  # None = the whole split
    retain_epochs: int
    full_epochs: int
    lr: float
    batch: int
    seed: int = 0


SIZES = {
    "default": TinySize(vocab=4096, hidden=128, layers=2, heads=4, ffn=344, retain_rows=None,
                        retain_epochs=3, full_epochs=3, lr=2e-3, batch=32),
    "test": TinySize(vocab=512, hidden=64, layers=2, heads=2, ffn=160, retain_rows=160,
                     retain_epochs=1, full_epochs=1, lr=3e-3, batch=16),
}


def current_size(size: str | None = None) -> str:
    size = size or os.environ.get("HARNESS_TINY_SIZE") or "default"
    if size not in SIZES:
        raise HarnessError(f"HARNESS_TINY_SIZE={size!r}: valid sizes are {', '.join(SIZES)}")
    return size


def tofu_rows(name: str) -> list[dict]:
    return read_jsonl(bundled_dir() / "tofu" / f"{name}.jsonl")


def _corpus() -> list[str]:
    """Text the tokenizer learns from: every bundled TOFU string plus the MUSE-News QA/verbmem text."""
    texts = []
    for f in sorted((bundled_dir() / "tofu").glob("*.jsonl")):
        if f.name == "idk.jsonl":
            texts += f.read_text(encoding="utf-8").splitlines()
            continue
        for row in read_jsonl(f):
            for v in row.values():
                texts += v if isinstance(v, list) else [v]
    for sub in ("knowmem", "verbmem", "privleak"):
        for f in sorted((bundled_dir() / "muse_news" / sub).glob("*.jsonl")):
            for row in read_jsonl(f):
                texts += [v for v in row.values() if isinstance(v, str)]
    return [t for t in texts if isinstance(t, str) and t]


def build_tokenizer(size: TinySize):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size.vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])


def build_base_model(size: TinySize, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(size.seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.ffn,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def root(size: str | None = None) -> Path:
    name = current_size(size)
    fp = config_hash({"v": BUILD_VERSION, **asdict(SIZES[name])})
    return harness_home() / "tiny" / f"{name}-{fp}"


def complete(d: Path, recipe_version=None, *, check_version: bool = True) -> bool:
    marker = d / ".complete"
    if not (marker.is_file() and (d / "config.json").is_file()):
        return False
    if not check_version:
        return True
    try:
        return json.loads(marker.read_text()).get("recipe_version") == recipe_version
    except (OSError, ValueError):
        return False


def qa_items(tokenizer, rows: list[dict]) -> list[dict]:
    from harness.data.encode import encode_qa

    return [encode_qa(tokenizer, TINY_TEMPLATE, r["question"], r["answer"]) for r in rows]


def finetune_rows(model, tokenizer, rows, epochs: int, size: TinySize, desc: str):
    from harness.training import TrainConfig, finetune

    cfg = TrainConfig(epochs=epochs, lr=size.lr, batch_size=size.batch, per_device_batch=size.batch,
                      warmup_epochs=0.0, weight_decay=0.01, schedule="linear", optimizer="adamw_torch",
                      seed=size.seed)
    return finetune(model, tokenizer, qa_items(tokenizer, rows), cfg, desc=desc).model


def write_template(d: Path) -> None:
    """The tiny template travels with each checkpoint, so ``--model <dir>`` needs no ``--template``."""
    from harness.io import write_yaml
    from harness.models.load import CHECKPOINT_TEMPLATE

    if not (d / CHECKPOINT_TEMPLATE).is_file():
        write_yaml(d / CHECKPOINT_TEMPLATE, {k: v for k, v in TINY_TEMPLATE.to_dict().items() if v is not None})
