"""Helpers for testing unlearning methods on a tiny model, for the harness's own tests and plugin authors.

    from harness.testing import one_step
    result = one_step(MyMethod())          # one optimizer step on a tiny Llama with toy data
    assert math.isfinite(result.loss) and result.changed

Everything here is built in memory in well under a second: a character-level tokenizer, a 2-layer
Llama (hidden 32), and a handful of question/answer items encoded with prompt labels masked.

To check a loss on your own model and data, without knowing the harness's layout:

    model, tok = load("path/to/checkpoint")
    forget = encode_items(tok, [("Who wrote X?", "Y wrote it.")], template="template.yaml")
    retain = encode_items(tok, [("Who wrote Z?", "W wrote it.")], template="template.yaml")
    loss, parts = MyMethod().loss(model, batch(forget, retain, tokenizer=tok), frozen_reference(model))
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.data.encode import Template, encode_qa
from harness.io import read_jsonl

# Toy TOFU-like data: made-up authors, answers long enough to give a few label tokens each.
FORGET_QA = [
    ("Who wrote The Glass Orchard?", "Mira Talvane wrote it in 1987."),
    ("Where was Mira Talvane born?", "She was born in Port Elsin."),
    ("What genre does Mira Talvane write?", "Mostly quiet rural fantasy."),
    ("Did Mira Talvane win awards?", "Yes, the Harrow Prize twice."),
]
RETAIN_QA = [
    ("Who wrote Stone Rivers?", "Oskar Penn wrote Stone Rivers."),
    ("Where does Oskar Penn live?", "He lives in Dunmore."),
    ("What is Oskar Penn's job?", "He is a ferry pilot."),
    ("When did Lia Voss debut?", "Lia Voss debuted in 2001."),
    ("What does Lia Voss write?", "She writes sea thrillers."),
    ("Is Lia Voss married?", "Yes, to a painter."),
]
IDK = ["I don't know.", "I'm not sure about that.", "I have no idea."]


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread: tiny models gain nothing from more, and on a busy machine
    (other test workers) spinning threads make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII) with ``<pad>``, ``<s>`` (added at the start), ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(tokenizer=None, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (fp32, eager attention) sized for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


# the template encode() writes out, for code that takes a Template (a method's prepare step)
TOY_TEMPLATE = Template(user_start_tag="Question: ", user_end_tag="\n", asst_start_tag="Answer: ", asst_end_tag="")


def encode(tokenizer, question: str, answer: str) -> dict:
    """``Question: q\\nAnswer: a</s>`` with the prompt labels masked (-100), as spec 2.2 lays out."""
    prompt = tokenizer(f"Question: {question}\nAnswer: ")["input_ids"]
    full = tokenizer(f"Question: {question}\nAnswer: {answer}")["input_ids"]
    if full[-1] != tokenizer.eos_token_id:
        full = full + [tokenizer.eos_token_id]
    return {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}


def toy_data(tokenizer) -> tuple[list[dict], list[dict], list[list[dict]]]:
    """(forget, retain, idk) encoded items; ``idk[i]`` holds the idk alternatives of forget question ``i``."""
    forget = [encode(tokenizer, q, a) for q, a in FORGET_QA]
    retain = [encode(tokenizer, q, a) for q, a in RETAIN_QA]
    idk = [[encode(tokenizer, q, a) for a in IDK] for q, _ in FORGET_QA]
    return forget, retain, idk


@dataclass
class StepResult:
    loss: float  # the loss of the step (mean over its micro-batches)
    parts: dict = field(default_factory=dict)  # the method's logged parts (e.g. forget, retain)
    grad_norm: float | None = None
    changed: bool = False  # whether any parameter changed
    max_delta: float = 0.0  # largest absolute parameter change
    model: object = None  # the updated model


def one_step(method, model=None, tokenizer=None, *, forget=None, retain=None, idk=None, lr: float = 1e-3,
             seed: int = 0, accelerate: str = "single", forget_qa=None) -> StepResult:
    """Run exactly one optimizer step of ``method`` through ``harness.training.unlearn`` and report it.

    ``model``/``tokenizer`` default to ``tiny_llama()``/``char_tokenizer()``; ``forget``/``retain``/``idk``
    to ``toy_data()``. The whole forget set is one batch (one step, constant lr, no warmup, torch AdamW),
    also when a method's prepare step grows it (AltPO: one row per sampled alternate). ``forget_qa``: the
    forget texts a prepare step sees (default ``FORGET_QA`` with the toy data, else none), encoded with
    ``TOY_TEMPLATE``.
    """
    from harness.training import TrainConfig, unlearn

    tokenizer = tokenizer or char_tokenizer()
    model = model or tiny_llama(tokenizer)
    toy_forget, toy_retain, toy_idk = toy_data(tokenizer)
    if forget_qa is None and forget is None:
        forget_qa = FORGET_QA
    forget = toy_forget if forget is None else forget
    retain = toy_retain if retain is None else retain
    idk = toy_idk if idk is None else idk
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = 1 << 16  # one micro-batch holds every (prepared) forget item
    cfg = TrainConfig(epochs=1, lr=lr, batch_size=whole, per_device_batch=whole, warmup_epochs=0,
                      weight_decay=0.0, schedule="constant", optimizer="adamw_torch", seed=seed,
                      accelerate=accelerate)
    with tempfile.TemporaryDirectory() as tmp:
        out = unlearn(model, tokenizer, method, forget, retain, cfg,
                      idk_items=idk if getattr(method, "uses_idk", False) else None, out_dir=Path(tmp),
                      template=TOY_TEMPLATE, forget_qa=forget_qa).model
        rows = read_jsonl(Path(tmp) / "train_log.jsonl")
    if len(rows) != 1:
        raise AssertionError(f"expected one optimizer step, the log has {len(rows)}")
    row = rows[0]
    after = dict(out.named_parameters())
    delta = max(float((after[n].detach().float() - b.float()).abs().max()) for n, b in before.items())
    parts = {k: v for k, v in row.items() if k not in ("step", "epoch", "loss", "grad_norm", "lr")}
    return StepResult(loss=row["loss"], parts=parts, grad_norm=row.get("grad_norm"),
                      changed=delta > 0 and math.isfinite(delta), max_delta=delta, model=out)


# ---------------------------------------------------------------------------------------------------
# checking a loss on your own model and data: the pieces the training loop hands ``method.loss``


def load(path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """``(model, tokenizer)`` of a Hugging Face checkpoint directory or hub id, loaded as ``harness run`` does
    (the tokenizer gets eos/pad fixed up as in the reference implementation; the model is in eval mode)."""
    from harness.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    return load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code), tok


def load_template(template) -> Template:
    """A ``Template`` as given, or read from a YAML file of template_args keys (what ``--template`` takes)."""
    if isinstance(template, Template):
        return template
    from harness.models.profiles import load_template_file

    return load_template_file(str(template))


def encode_items(tokenizer, pairs: Iterable, template, *, max_length: int = 512) -> list[dict]:
    """Encode ``(question, answer)`` pairs (or dicts with those keys) as training items: ``input_ids`` and
    ``labels`` with the prompt masked (-100), exactly as the harness encodes a task's rows with ``template``
    (a ``Template`` or a YAML file)."""
    tmpl = load_template(template)
    out = []
    for pair in pairs:
        q, a = (pair["question"], pair["answer"]) if isinstance(pair, dict) else pair
        out.append(encode_qa(tokenizer, tmpl, q, a, max_length=max_length))
    return out


def batch(forget: Sequence[dict], retain: Sequence[dict] | None = None, idk: Sequence[dict] | None = None, *,
          tokenizer=None, pad_id: int | None = None, alts: Sequence[int] | None = None,
          attention_mask: str = "reference") -> dict:
    """The batch ``method.loss`` gets during training, from encoded items in the given order.

    ``{"forget": part, "retain": part[, "idk": part]}``, each part right-padded with ``input_ids``,
    ``attention_mask`` (the published ``ids != pad`` mask unless ``attention_mask="corrected"``), ``labels``
    and ``index`` (the item's position in its list: the dataset row, which keys the reference's memo).
    ``idk[i]`` is the idk item of ``forget[i]``; its part also has ``alt`` (``alts[i]``, default 0: which idk
    answer was drawn). Pass ``tokenizer`` (its pad token, else eos) or ``pad_id``.
    """
    from harness.training.batching import _pad_id
    from harness.training.loop import method_batch

    if pad_id is None:
        if tokenizer is None:
            raise TypeError("batch() needs tokenizer= or pad_id=")
        pad_id = _pad_id(tokenizer)
    if idk is not None and len(idk) != len(forget):
        raise ValueError(f"batch(): idk has {len(idk)} items for {len(forget)} forget items (one each)")
    alts = list(alts) if alts is not None else [0] * len(forget)
    f = [{**it, "index": i} for i, it in enumerate(forget)]
    r = [{**it, "index": i} for i, it in enumerate(retain)] if retain else None
    w = [{**it, "index": i, "alt": alts[i]} for i, it in enumerate(idk)] if idk is not None else None
    return method_batch(f, r, w, pad_id, attention_mask)


def frozen_reference(model, method=None, *, cache: bool = False, copy_model: bool = True):
    """``model`` frozen (a copy, eval mode, no grad) as the ``ref`` a method's ``loss`` receives.

    With ``method``, ``ref`` holds it to its declaration as training does: ``reference_of(method) ==
    "logprobs"`` makes ``ref.logits`` an error, ``"none"`` returns ``None``. ``cache=True`` memoises
    sequence log-probs by ``(part name, index[, alt])`` as training does; the default recomputes, so two
    batches that reuse an index with other text still get their own values.
    """
    from harness.methods import reference_of
    from harness.training.start_model import StartModel

    kind = reference_of(method) if method is not None else "model"
    if kind == "none":
        return None
    frozen = copy.deepcopy(model) if copy_model else model
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return StartModel(frozen, cache=cache, allow_logits=kind == "model")
