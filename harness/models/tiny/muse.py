"""Tiny MUSE-News models for the embedded ``tiny`` profile (kinds ``muse_news_retrain``, ``muse_news_target``).

MUSE's retrain model never saw the forget corpus and its target saw forget and retain text. The
tiny pair mirrors that cheaply from the bundled MUSE-News pieces:

- ``muse_news_retrain``: the tiny base model trained on the retain side: the privleak *retain*
  texts (short pretraining chunks), then the knowmem retain QA pairs;
- ``muse_news_target``: the retrain model continued on the forget side: the parts of the raw forget
  corpus that the metrics probe (the privleak *forget* texts and the verbmem passages, all excerpts
  of raw/forget), then the knowmem forget QA pairs with the retain pairs replayed.

The whole raw corpora would take far longer than minutes on CPU; the probed excerpts give the
metrics (verbmem, knowmem, Min-k privleak) something to find: privleak texts are cut to the tokens
Min-k reads, verbmem passages keep only the end of their prompt. The privleak holdout texts are
never trained on. QA pairs use the tiny profile's template, the one every tiny run is scored with,
and train in their own batches (mixed with 256-token chunks they would be padded to 256).
MUSE-Books has no bundled data, so its tiny kinds explain how to get a model instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from harness import HarnessError
from harness.io import read_jsonl
from harness.models.tiny.build import SIZES, TINY_TEMPLATE
from harness.paths import bundled_dir

log = logging.getLogger("harness")

RECIPE_VERSION = 3
MAX_POSITIONS = 4096


@dataclass(frozen=True)
class MuseRecipe:
    chunk: int              # pretraining chunk length (tokens)
    docs: int | None        # rows of each text split used (None = all 100)
    doc_tokens: int         # privleak texts are cut to this many tokens: Min-k reads no further (spec 6.4)
    verbmem_context: int    # tokens of the verbmem prompt kept before the gt passage
    qa: int | None          # knowmem QA rows used per side (None = all)
    qa_epochs: int          # QA pairs are trained in their own short batches, after the text
    text_epochs: int
    verbmem_epochs: int


RECIPES = {
    "default": MuseRecipe(chunk=256, docs=None, doc_tokens=2048, verbmem_context=128, qa=None, qa_epochs=4,
                          text_epochs=1, verbmem_epochs=2),
    "test": MuseRecipe(chunk=128, docs=12, doc_tokens=1024, verbmem_context=64, qa=24, qa_epochs=2,
                       text_epochs=1, verbmem_epochs=1),
}


def _rows(sub: str, split: str, n: int | None) -> list[dict]:
    rows = read_jsonl(bundled_dir() / "muse_news" / sub / f"{split}.jsonl")
    return rows if n is None else rows[:n]


def _size_name(size) -> str:
    for name, s in SIZES.items():
        if s == size:
            return name
    return "default"


def _head(tokenizer, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


def _tail(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[-n:]) if n else ""


def privleak_texts(tokenizer, split: str, recipe: MuseRecipe) -> list[str]:
    return [_head(tokenizer, r["text"], recipe.doc_tokens) for r in _rows("privleak", split, recipe.docs)]


def verbmem_texts(tokenizer, recipe: MuseRecipe) -> list[str]:
    """Each verbmem passage (gt) with the end of its prompt, as the raw forget text has them."""
    return [_tail(tokenizer, r["prompt"], recipe.verbmem_context) + " " + r["gt"]
            for r in _rows("verbmem", "forget", recipe.docs)]


def _qa_items(tokenizer, side: str, recipe: MuseRecipe) -> list[dict]:
    from harness.data.encode import encode_qa

    return [encode_qa(tokenizer, TINY_TEMPLATE, r["question"], r["answer"])
            for r in _rows("knowmem", f"{side}_qa", recipe.qa)]


def _train(model, tok, items: list[dict], epochs: int, size, desc: str):
    import torch

    from harness.training import TrainConfig, finetune

    torch.manual_seed(size.seed)
    cfg = TrainConfig(epochs=epochs, lr=size.lr, batch_size=size.batch, per_device_batch=size.batch,
                      warmup_epochs=0.0, weight_decay=0.01, schedule="linear", optimizer="adamw_torch",
                      seed=size.seed)
    log.info("%s: %d items for %d epoch(s)", desc, len(items), epochs)
    return finetune(model, tok, items, cfg, desc=desc).model


def _load(parent_dir):
    from harness.models.load import load_model, load_tokenizer

    model = load_model(str(parent_dir))
    # MUSE items are BOS + up to 2048 tokens (spec 2.3/6.4), one more than the tiny base declares; Llama-2
    # has a 4096 context. Rotary embeddings have no weights, so only the declared limit changes.
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, MAX_POSITIONS)
    return model, load_tokenizer(str(parent_dir))


def build_retrain(size, parent_dir_fn):
    """Base model -> privleak retain texts -> retain QA pairs."""
    from harness.data.encode import chunk_corpus

    recipe = RECIPES[_size_name(size)]
    model, tok = _load(parent_dir_fn("base"))
    text = chunk_corpus(tok, privleak_texts(tok, "retain", recipe), recipe.chunk)
    model = _train(model, tok, text, recipe.text_epochs, size, "tiny muse_news_retrain (text)")
    model = _train(model, tok, _qa_items(tok, "retain", recipe), recipe.qa_epochs, size, "tiny muse_news_retrain (QA)")
    return model, tok


def build_target(size, parent_dir_fn):
    """Retrain model -> privleak forget texts -> verbmem passages -> forget and retain QA pairs."""
    from harness.data.encode import chunk_corpus, encode_text

    recipe = RECIPES[_size_name(size)]
    model, tok = _load(parent_dir_fn("muse_news_retrain"))
    text = chunk_corpus(tok, privleak_texts(tok, "forget", recipe), recipe.chunk)
    model = _train(model, tok, text, recipe.text_epochs, size, "tiny muse_news_target (privleak text)")
    # one item per passage, so each gt always follows the same stretch of its prompt
    verb = [encode_text(tok, "", t, max_length=4 * recipe.chunk) for t in verbmem_texts(tok, recipe)]
    model = _train(model, tok, verb, recipe.verbmem_epochs, size, "tiny muse_news_target (verbmem text)")
    qa = _qa_items(tok, "forget", recipe) + _qa_items(tok, "retain", recipe)
    model = _train(model, tok, qa, recipe.qa_epochs, size, "tiny muse_news_target (QA)")
    return model, tok


def _books(kind: str):
    def build(size, parent_dir_fn):
        raise HarnessError(
            f"tiny:{kind}: MUSE-Books text is not bundled (copyrighted), so no tiny Books model can be built; "
            "pass --model with the MUSE-Books target (e.g. --model llama2-7b or muse-bench/MUSE-Books_target) "
            "and the data via the hub or --data-dir DIR holding <subset>/<split>.jsonl")

    return build


def _versioned(fn):
    fn.recipe_version = RECIPE_VERSION
    return fn


KINDS = {"muse_news_retrain": _versioned(build_retrain), "muse_news_target": _versioned(build_target),
         "muse_books_retrain": _books("muse_books_retrain"), "muse_books_target": _books("muse_books_target")}
