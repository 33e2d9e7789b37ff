"""The prepare step a method may run on the start model before training (``Method.prepare(start)``).

AltPO uses it to sample alternate answers to the forget questions (spec section 3). What a method
builds here is cached in the run directory (``<run>/prepare/<name>.json``), so a resumed run does
not rebuild it: the file is written atomically (temp file + rename) and holds the key it was built
for, so a partial, unreadable or stale file is rebuilt, never read as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import HarnessError
from harness.data.encode import Template, collate, encode_qa
from harness.io import write_json

log = logging.getLogger("harness")
CACHE_FORMAT = 1


@dataclass
class Preparation:
    """What ``Method.prepare(start)`` gets: the start model and the forget set, before any update.

    - ``model``/``tokenizer``: the start model (the copy that will be trained, still unchanged).
    - ``items``: the encoded forget items, in dataset order; ``qa``: their ``(question, answer)`` texts
      (``None`` for corpus tasks such as MUSE, which have no questions).
    - ``seed``: the run seed; ``generate`` draws from a generator seeded by it, never the global RNG.
    - ``encode(question, answer)``: a training item in the model's prompt template.
    - ``generate(prompts, ...)``: batched sampling from the start model (each prompt a user turn).
    - ``cached(name, key, build)``: ``build()``'s JSON-serialisable result, cached in the run directory.
    """

    model: Any
    tokenizer: Any
    items: list[dict]
    qa: list[tuple[str, str]] | None = None
    template: Template | None = None
    seed: int = 0
    cache_dir: Path | None = None
    batch_size: int = 32  # prompts per generate() call
    max_length: int = 512
    accelerator: Any = None
    generate_calls: int = field(default=0, init=False)  # generate() batches run (tests, logs)

    def require_qa(self, method: str) -> list[tuple[str, str]]:
        if self.qa is None or self.template is None:
            raise HarnessError(f"method '{method}' needs question/answer forget data (a task with "
                               "training.format: qa, e.g. TOFU); this task's forget set is a text corpus")
        return self.qa

    def encode(self, question: str, answer: str) -> dict:
        """``question`` with ``answer`` as a training item (prompt labels -100), as the forget items are."""
        return encode_qa(self.tokenizer, self._template(), question, answer, max_length=self.max_length)

    def _template(self) -> Template:
        if self.template is None:
            raise HarnessError("the prepare step has no prompt template (pass template= to unlearn)")
        return self.template

    def cached(self, name: str, key: dict, build: Callable[[], Any]) -> Any:
        """``build()``, or the value cached under ``name`` for the same ``key`` in this run's directory.

        Without a run directory it always builds. Under several processes rank 0 builds and writes, the
        others wait and read the same file, so every rank trains on the same data."""
        if self.cache_dir is None:
            return build()
        path = Path(self.cache_dir) / f"{name}.json"
        digest = _digest(key)
        hit = _load(path, digest)
        if hit is not None:
            log.info("prepare: reusing %s", path)
            return hit[0]
        acc = self.accelerator
        if acc is None or acc.is_main_process:
            value = build()
            write_json(path, {"format": CACHE_FORMAT, "key": digest, "value": value})
        if acc is not None and acc.num_processes > 1:
            acc.wait_for_everyone()
        hit = _load(path, digest)
        if hit is None:
            raise HarnessError(f"prepare: {path} was not written (or not readable after writing)")
        return hit[0]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 200, stop: Sequence[str] = (), cache: str | None = None) -> list[list[str]]:
        """``n`` sampled completions of each prompt (a user turn in the model's template), ``out[i][k]``.

        Prompts are batched ``batch_size`` at a time, left-padded; each batch is sampled ``n`` times (one
        ``generate`` call per repeat, as the reference's generate.py does). A completion ends at eos or at
        the first stop string and is cut there and stripped. Sampling uses the model's generation config
        with ``do_sample`` and ``temperature`` set, under a torch RNG seeded from ``seed`` and restored
        afterwards. With ``cache`` the result is cached in the run directory under that name."""
        prompts = list(prompts)
        settings = {"prompts": prompts, "n": n, "temperature": temperature, "max_new_tokens": max_new_tokens,
                    "stop": list(stop), "seed": self.seed, "template": self._template().to_dict()}
        if cache is not None:
            return self.cached(cache, settings, lambda: self.generate(
                prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop))
        return self._sample(prompts, n, temperature, max_new_tokens, list(stop))

    def _sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                stop: list[str]) -> list[list[str]]:
        tok, model = self.tokenizer, self.model
        eos = tok.eos_token_id
        items = [encode_qa(tok, self._template(), p, "", max_length=self.max_length, generate=True)
                 for p in prompts]
        kwargs = dict(do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos, use_cache=True)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tok)
        out: list[list[str]] = [[] for _ in prompts]
        device = self.accelerator.device if self.accelerator is not None else next(model.parameters()).device
        was_training = model.training
        model.to(device).eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                for start in range(0, len(items), self.batch_size):
                    batch = collate(items[start:start + self.batch_size], kwargs["pad_token_id"], side="left",
                                    mask="corrected")
                    ids = batch["input_ids"].to(device)
                    for _ in range(n):
                        gen = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                             **kwargs)
                        self.generate_calls += 1
                        for row, new in enumerate(gen[:, ids.shape[1]:].tolist()):
                            text = tok.decode(new, skip_special_tokens=True)
                            out[start + row].append(_cut(text, stop))
        finally:
            model.train(was_training)
        return out


def _cut(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text.strip()


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _load(path: Path, digest: str) -> tuple[Any] | None:
    """The cached value (in a 1-tuple) if ``path`` holds a complete cache for ``digest``, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("prepare: %s is unreadable or incomplete; building it again", path)
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or "value" not in data:
        log.warning("prepare: %s is not a complete cache file; building it again", path)
        return None
    if data.get("key") != digest:
        log.warning("prepare: %s was built for other settings; building it again", path)
        return None
    return (data["value"],)


def run_prepare(method, start: Preparation) -> dict[str, list[dict]]:
    """Call ``method.prepare(start)`` and check what it returns: ``{}`` or parts aligned with the anchor.

    ``"forget"`` (optional) replaces the forget items; every other name is a batch part with one item per
    (new) forget item, collated next to it (``batch[name]``)."""
    name = getattr(method, "name", type(method).__name__)
    prepare = getattr(method, "prepare", None)
    out = prepare(start) if prepare is not None else None
    if out is None:
        return {}
    if not isinstance(out, dict) or not all(isinstance(v, list) for v in out.values()):
        raise HarnessError(f"method '{name}': prepare() must return None or a dict of lists of items")
    n = len(out.get("forget", start.items))
    reserved = {"retain", "idk"} & set(out)
    if reserved:
        raise HarnessError(f"method '{name}': prepare() may not return the core part(s) {sorted(reserved)}")
    for part, items in out.items():
        if len(items) != n:
            raise HarnessError(f"method '{name}': prepare() part '{part}' has {len(items)} items for {n} forget items")
    if n == 0:
        raise HarnessError(f"method '{name}': prepare() left no forget items")
    return out
