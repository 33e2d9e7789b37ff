"""Turning rows into token ids and batches, exactly as the reference implementation does.

Spec sections 2.2 (QA / chat items), 2.3 (pretraining chunks and completion items) and 2.5
(the collator, including its attention-mask quirk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from harness import HarnessError
from harness.options import ATTENTION_MASKS

IGNORE = -100
TAGS = ("user_start_tag", "user_end_tag", "asst_start_tag", "asst_end_tag")


@dataclass(frozen=True)
class Template:
    """open-unlearning ``template_args``: either the tokenizer's chat template or explicit tags."""

    apply_chat_template: bool = False
    system_prompt: str | None = None
    system_prompt_with_special_tokens: str | None = None
    user_start_tag: str = ""
    user_end_tag: str = ""
    asst_start_tag: str = ""
    asst_end_tag: str = ""
    date_string: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, source: str = "template") -> Template:
        """``None``: the default (no template given). A given template must be complete: either
        ``apply_chat_template: true`` or all four tags (an empty string is a valid tag, a missing key is
        not: it would silently render prompts without the model's turn markers)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise HarnessError(f"{source}: expected a mapping of template_args keys, got {type(d).__name__}")
        if not d:
            raise HarnessError(f"{source}: the template is empty; set apply_chat_template: true or the tags "
                               f"{', '.join(TAGS)}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HarnessError(f"{source}: unknown template key(s) {unknown}; valid: {sorted(names)}")
        if not isinstance(d.get("apply_chat_template", False), bool):
            raise HarnessError(f"{source}: apply_chat_template must be true or false, "
                               f"got {d['apply_chat_template']!r}")
        for k, v in d.items():
            if k != "apply_chat_template" and v is not None and not isinstance(v, str):
                raise HarnessError(f"{source}: {k} must be a string, got {v!r}")
        missing = [t for t in TAGS if t not in d]
        if not d.get("apply_chat_template") and missing:
            raise HarnessError(f"{source}: missing template key(s) {', '.join(missing)} (use \"\" for an empty "
                               "tag), or set apply_chat_template: true to use the tokenizer's chat template")
        return cls(**{k: ("" if v is None and k in TAGS else v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chat_kwargs(template: Template) -> dict:
    return {"date_string": template.date_string} if template.date_string is not None else {}


def _ids(out) -> list[int]:
    # transformers 5 may return a BatchEncoding from apply_chat_template(tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def encode_qa(tokenizer, template: Template, question: str, answer: str, *, fewshot=(),
              max_length: int = 512, generate: bool = False) -> dict[str, list[int]]:
    """Spec 2.2 ``preprocess_chat_instance`` for one (question, answer) with optional few-shot pairs.

    Labels are -100 over the prompt and cover the answer plus eos (appended when the rendered
    conversation does not already end in it). With ``generate`` the input is the prompt alone and
    the labels are the whole conversation (used only to recover the target text).
    """
    if template.apply_chat_template:
        chat = []
        if template.system_prompt is not None:
            chat.append({"role": "system", "content": template.system_prompt})
        for q, a in fewshot:
            chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        kw = _chat_kwargs(template)
        chat_ids = _ids(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, **kw))
        prompt_ids = _ids(tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True, **kw))
    else:
        t = template
        wrapped = t.system_prompt_with_special_tokens or ""
        for q, a in fewshot:
            wrapped += t.user_start_tag + q + t.user_end_tag + t.asst_start_tag + a + t.asst_end_tag
        wrapped += t.user_start_tag + question + t.user_end_tag + t.asst_start_tag
        chat_ids = tokenizer(wrapped + answer, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
        prompt_ids = tokenizer(wrapped, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    chat_ids = list(chat_ids)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids.append(tokenizer.eos_token_id)
    n_prompt = len(prompt_ids)
    if generate:
        return {"input_ids": list(prompt_ids), "labels": chat_ids}
    return {"input_ids": chat_ids, "labels": [IGNORE] * n_prompt + chat_ids[n_prompt:]}


def encode_text(tokenizer, prefix: str, text: str, *, max_length: int, insert_space: bool = False,
                generate: bool = False) -> dict[str, list[int]]:
    """Spec 2.3 ``preprocess_pretraining_instance``: labels on the text only, never on index 0, no eos."""
    full = tokenizer(prefix + (" " if insert_space else "") + text, add_special_tokens=True)["input_ids"]
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    full = list(full[: len(prefix_ids) + max_length])
    n = max(len(prefix_ids), 1)
    labels = [IGNORE] * n + full[n:]
    if generate:
        return {"input_ids": list(prefix_ids), "labels": labels}
    return {"input_ids": full, "labels": labels}


def chunk_corpus(tokenizer, texts, max_length: int) -> list[dict[str, list[int]]]:
    """Spec 2.3 ``PretrainingDataset``: join with blank lines, cut into max_length-token chunks,
    decode each chunk and re-encode it as a pretraining item (BOS added, label 0 ignored)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i * max_length:(i + 1) * max_length] for i in range(len(ids) // max_length + 1)]
    out = []
    for chunk in chunks:
        text = tokenizer.decode(chunk)
        out.append(encode_text(tokenizer, "", text, max_length=max_length))
    return out


def collate(items: list[dict], pad_id: int, *, side: str = "right", mask: str = "reference") -> dict[str, torch.Tensor]:
    """Pad a list of encoded items into tensors.

    ``mask="reference"`` reproduces the reference collator: attention_mask = (input_ids != pad_id),
    which with pad = eos also hides every real eos/<|eot_id|> (spec 13.1). ``mask="corrected"`` is the
    corrected variant that masks only the padding.
    """
    if side not in ("right", "left"):
        raise HarnessError(f"padding side must be 'right' or 'left', got {side!r}")
    if mask not in ATTENTION_MASKS:
        raise HarnessError(f"attention mask must be one of {', '.join(ATTENTION_MASKS)}, got {mask!r}")
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    # labels are padded on their own: in generation items they are longer than the prompt ids
    lwidth = max(len(it["labels"]) for it in items)
    labels = torch.full((len(items), lwidth), IGNORE, dtype=torch.long)
    real = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n, m = len(it["input_ids"]), len(it["labels"])
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(it["input_ids"], dtype=torch.long)
        real[i, sl] = 1
        lab = torch.tensor(it["labels"], dtype=torch.long)
        if side == "right":
            labels[i, :m] = lab
        else:
            labels[i, lwidth - m:] = lab
    batch = {"input_ids": ids, "labels": labels,
             "attention_mask": (ids != pad_id).long() if mask == "reference" else real}
    if "index" in items[0]:
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch
