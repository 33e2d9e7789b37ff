"""The scoring context: ``EvalContext`` memoises the expensive primitives per (model, data source).

One teacher-forced forward pass per encoded sequence (answer NLL, token log-probs, argmax hits,
Min-k++ z-scores) and one greedy generation per prompt; ``forget_quality``, ``forget_truth_ratio``,
``forget_Q_A_Prob``, the MIA attacks and extraction strength therefore share forward passes.
Metric results are memoised too (``ctx.score(name)``), so every dependency of a metric lands in
``<BENCH>_EVAL.json`` exactly once, as in the reference's ``pre_compute`` cache.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from harness import HarnessError
from harness.metrics import Score, Source
from harness.options import ATTENTION_MASKS, EVAL_BATCH_SIZE
from harness.scoring.shard import is_writer, sharded


def missing_reference_error(task: str, metric: str) -> HarnessError:
    return HarnessError(
        f"metric '{metric}' of task '{task}' needs a reference (the retain model or its eval log) and none is set: "
        "pass --reference DIR|LOG (a retain model directory or hub id, an open-unlearning *_EVAL.json, "
        "or for privleak a *_SUMMARY.json), or use a model profile that ships one (harness ls models)")


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Source):
        return ("Source", *astuple_safe(v))
    return v


def astuple_safe(s: Source) -> tuple:
    return tuple(getattr(s, f.name) for f in fields(s))


class _MemoTokenizer:
    """The tokenizer with ``__call__`` memoised by (text, options): a question's prompt is encoded
    once for all its answers and for both its scoring and its generation item."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: dict[tuple, tuple] = {}

    def __call__(self, text: str, **kw) -> dict:
        key = (text, tuple(sorted(kw.items())))
        if key not in self._ids:
            self._ids[key] = tuple(self._tok(text, **kw)["input_ids"])
        return {"input_ids": list(self._ids[key])}

    def __getattr__(self, name):
        return getattr(self._tok, name)


class EvalContext:
    """Everything a metric function ``(ctx, **args) -> Score`` may read.

    ``task``, ``tokenizer``, ``template``, ``batch_size``, ``attention_mask`` (reference|corrected);
    data via ``rows(role)``; primitives via ``stats``, ``probability``, ``generations``,
    ``label_texts``, ``gradnorms``; other metrics via ``score(name, **args)``; the reference via
    ``reference_entry(key, metric=...)`` and ``reference_model()``.

    ``share=False`` disables sharing of primitives between metrics (each metric computes its own
    passes, like a naive implementation); it exists for the speed benchmark. ``shared_prefix=False``
    scores every answer of an option set (perturbed answers) with its own full pass instead of
    reusing the question's KV cache (same numbers up to float rounding).
    """

    def __init__(self, task, model, tokenizer, template, *, reference=None, batch_size: int = EVAL_BATCH_SIZE,
                 attention_mask: str = "reference", limit: int | None = None, progress: bool = True,
                 registry=None, data_dir=None, share: bool = True, sort: bool = True,
                 reference_options: dict | None = None, label: str = "target", max_length: int | None = None,
                 resolve_reference=None, timings: list | None = None, shared_prefix: bool = True,
                 subset: dict[str, list[int]] | None = None):
        if attention_mask not in ATTENTION_MASKS:
            raise HarnessError(f"attention_mask must be one of {ATTENTION_MASKS}, got {attention_mask!r}")
        if batch_size < 1:
            raise HarnessError(f"batch size must be positive, got {batch_size}")
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.attention_mask = attention_mask
        self.limit = limit
        self.progress = progress and is_writer()  # one set of bars in a multi-process job
        self.data_dir = data_dir
        self.share = share
        self.sort = sort
        self.shared_prefix = shared_prefix  # option sets: one pass over the question, reused per answer
        self.label = label  # names the model in progress bars
        self.max_length = max_length  # --max-length: caps every source's max_length
        # role -> row indices (after --limit) scored instead of all rows: the held-out rows of an attack
        self.subset = {k: list(v) for k, v in (subset or {}).items()} or None
        self._registry = registry
        self._reference_spec = reference
        self._reference = None
        self._reference_options = reference_options or {}
        # (spec, ctx) -> RetainReference; passed in by the layer above so the context need not know its kinds
        self._resolve_reference = resolve_reference
        self._rows: dict[str, list[dict]] = {}
        self._prims: dict[tuple, Any] = {}
        self._memo: dict[tuple, Score] = {}
        self.scores: dict[str, Score] = {}  # by name, in order of completion (dependencies first)
        self.metric_args: dict[str, dict] = {}
        self._stack: list[str] = []
        # one entry per primitive computed: {"what", "source", "model", "seconds", "cpu", "rows", "tokens"};
        # the speed benchmark reads it, a reference context shares its parent's list
        self.timings: list[dict] = [] if timings is None else timings
        self._memo_tokenizer = _MemoTokenizer(tokenizer)

    # ---------------------------------------------------------------- data
    @property
    def registry(self):
        if self._registry is None:
            from harness.plugins import get_registry

            self._registry = get_registry()
        return self._registry

    @property
    def question_key(self) -> str:
        return self.task.prompt.get("question", "question") if self.task.prompt else "question"

    @property
    def answer_key(self) -> str:
        return self.task.prompt.get("answer", "answer") if self.task.prompt else "answer"

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pid is None else pid

    def rows(self, role: str) -> list[dict]:
        if role not in self._rows:
            from harness.data.splits import load_split

            with self._timed("data", role):
                rows = load_split(self.task.data_spec(role), self.data_dir)
            rows = rows[: self.limit] if self.limit else rows
            if self.subset and role in self.subset:
                rows = [rows[i] for i in self.subset[role]]
            self._rows[role] = rows
        return self._rows[role]

    def _tqdm(self, total: int, desc: str):
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    @contextmanager
    def _timed(self, what: str, source, *, model: str | None = None, rows: int = 0, tokens: int = 0):
        entry = {"what": what, "source": source.label() if isinstance(source, Source) else str(source),
                 "model": model or self.label, "seconds": 0.0, "cpu": 0.0, "rows": rows, "tokens": tokens}
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield entry
        finally:
            entry["seconds"] = time.perf_counter() - t0
            entry["cpu"] = time.process_time() - c0  # CPU seconds: what a shared machine disturbs least
            self.timings.append(entry)

    def _key(self, *parts) -> tuple:
        # the naive mode keys primitives by the metric being computed, so nothing is shared
        return parts if self.share else (*parts, tuple(self._stack[-1:]))

    def _encode(self, source: Source, generate: bool) -> tuple[list[dict], list]:
        """Encoded items (flat) and the per-row layout: an int (single) or list of ints (options)."""
        key = self._key("encode", source, generate)
        if key not in self._prims:  # stats, label texts and GradNorm of a source read the same items
            rows = self.rows(source.role)
            with self._timed("tokenise", source) as entry:
                items, layout = self._encode_rows(source, rows, generate)
                entry["rows"], entry["tokens"] = len(items), sum(len(it["input_ids"]) for it in items)
            self._prims[key] = (items, layout)
        return self._prims[key]

    def _encode_rows(self, source: Source, rows: list[dict], generate: bool) -> tuple[list[dict], list]:
        from harness.data.encode import encode_qa, encode_text

        tok = self._memo_tokenizer if self.share else self.tokenizer
        shots = ()
        if source.fewshot:
            shots = tuple((r[source.prompt], r[source.field]) for r in self.rows_all(source.fewshot))
        max_length = min(source.max_length, self.max_length) if self.max_length else source.max_length
        items, layout = [], []
        for n, row in enumerate(rows):
            if source.field not in row:
                raise HarnessError(f"task '{self.task.name}': data role '{source.role}' has no field "
                                   f"'{source.field}' (row {n} has {sorted(row)})")
            targets = row[source.field]
            multi = isinstance(targets, list)
            slots = []
            for t in targets if multi else [targets]:
                if source.kind == "qa":
                    q = row.get(source.prompt) if source.prompt else ""
                    if q is None:
                        raise HarnessError(f"task '{self.task.name}': data role '{source.role}' has no "
                                           f"question field '{source.prompt}'")
                    it = encode_qa(tok, self.template, q, t, fewshot=shots,
                                   max_length=max_length, generate=generate)
                elif source.kind == "text":
                    prefix = (row.get(source.prompt) or "") if source.prompt else ""
                    it = encode_text(tok, prefix, t or "", max_length=max_length,
                                     insert_space=source.insert_space, generate=generate)
                else:
                    raise HarnessError(f"unknown data source kind {source.kind!r} (qa or text)")
                slots.append(len(items))
                items.append(it)
            layout.append(slots if multi else slots[0])
        from harness.models.load import check_lengths

        check_lengths(self.model, [len(it["input_ids"]) for it in items], getattr(self.model, "name_or_path", "") or "the model",
                      what=f"task '{self.task.name}' data role '{source.role}'")
        return items, layout

    def rows_all(self, role: str) -> list[dict]:
        """All rows of a role, ignoring ``limit`` (few-shot sets are prompts, not samples)."""
        from harness.data.splits import load_split

        return load_split(self.task.data_spec(role), self.data_dir)

    @staticmethod
    def _unflatten(values: list, layout: list) -> list:
        return [[values[j] for j in slot] if isinstance(slot, list) else values[slot] for slot in layout]

    # ----------------------------------------------------------- primitives
    def stats(self, source, *, model: str = "target", need: str = "tokens") -> list:
        """P1-P3 ``SeqStats`` per row (a list per row for list-valued answer columns).

        ``need`` (``primitives.NEEDS``): "prob" (the loss only), "tokens" (also ``lp``, ``hit``;
        the default), "z" (also the Min-k++ z-scores). A pass computed for less is redone."""
        from harness.scoring.primitives import NEEDS, forward_stats, forward_stats_shared

        source = Source.of(source)
        key = self._key("stats", model, source)
        have = self._prims.get(("need", *key))
        if have is None or NEEDS.index(have) < NEEDS.index(need):
            items, layout = self._encode(source, generate=False)
            m = self.model if model == "target" else self.reference_model()
            who = self.label if model == "target" else "reference"
            bar = self._tqdm(len(items), f"{who} forward {source.label()}")
            try:
                def compute(items, layout):
                    groups = [s for s in layout if isinstance(s, list)]
                    if self.shared_prefix and self.share and groups and len(groups) == len(layout):
                        return forward_stats_shared(m, items, groups, self.pad_id, batch_size=self.batch_size,
                                                    attention_mask=self.attention_mask, sort=self.sort,
                                                    progress=bar, need=need)
                    return forward_stats(m, items, self.pad_id, batch_size=self.batch_size,
                                         attention_mask=self.attention_mask, sort=self.sort, progress=bar,
                                         need=need, naive=not self.share, slots=groups or None)

                with self._timed("forward", source, model=who, rows=len(items),
                                 tokens=sum(len(it["input_ids"]) for it in items)):
                    vals = sharded(compute, items, layout, batch_size=self.batch_size, model=m)
            finally:
                if bar is not None:
                    bar.close()
            self._prims[key] = self._unflatten(vals, layout)
            self._prims[("need", *key)] = need
        return self._prims[key]

    def probability(self, source, *, model: str = "target") -> list[dict]:
        """Per row ``{"prob", "avg_loss"}`` (lists for list-valued columns), the reference layout."""
        # option sets (list columns) are read as probabilities only; a single-answer source's pass also
        # keeps lp/hit, which the MIA and memorization metrics of the same source read (no second pass)
        source = Source.of(source)
        _, layout = self._encode(source, generate=False)
        options = bool(layout) and all(isinstance(x, list) for x in layout)
        need = "prob" if options or not self.share else "tokens"
        out = []
        for s in self.stats(source, model=model, need=need):
            if isinstance(s, list):
                out.append({"prob": [x.prob for x in s], "avg_loss": [x.avg_loss for x in s]})
            else:
                out.append({"prob": s.prob, "avg_loss": s.avg_loss})
        return out

    def generations(self, source, *, max_new_tokens: int = 200, stop=()) -> list[dict]:
        """P5 per row: ``{"input", "ground_truth", "generation"}`` (greedy, left padding)."""
        from harness.scoring.primitives import generate

        source = Source.of(source)
        key = self._key("gen", source, max_new_tokens, tuple(stop))
        if key not in self._prims:
            items, layout = self._encode(source, generate=True)
            if any(isinstance(s, list) for s in layout):
                raise HarnessError(f"generation needs one target per row; '{source.label()}' is a list column")
            bar = self._tqdm(len(items), f"{self.label} generate {source.label()}")
            try:
                with self._timed("generate", source, rows=len(items),
                                 tokens=sum(len(it["input_ids"]) for it in items)) as entry:
                    # generation batches: as many positions as a batch of full-length rows of this source
                    budget = (self.batch_size * min(source.max_length, self.max_length or source.max_length)
                              if self.share else None)
                    vals = sharded(lambda its, _: generate(
                        self.model, self.tokenizer, its, batch_size=self.batch_size,
                        attention_mask=self.attention_mask, max_new_tokens=max_new_tokens, stop=tuple(stop),
                        sort=self.sort, progress=bar, counts=entry, drop_finished=self.share, budget=budget),
                        items, layout, batch_size=self.batch_size, model=self.model)
            finally:
                if bar is not None:
                    bar.close()
            self._prims[key] = self._unflatten(vals, layout)
        return self._prims[key]

    def label_texts(self, source) -> list[str]:
        """Decoded label tokens of each row (skip special tokens), as the zlib attack reads them."""
        source = Source.of(source)
        key = ("labels", source)
        if key not in self._prims:
            items, layout = self._encode(source, generate=False)
            from harness.scoring.primitives import decode

            # decode() with the tokenizer's own clean-up default, as the reference's zlib attack
            clean = bool(getattr(self.tokenizer, "clean_up_tokenization_spaces", False))
            texts = [decode(self.tokenizer, [t for t in it["labels"] if t != -100], clean_up=clean) for it in items]
            self._prims[key] = self._unflatten(texts, layout)
        return self._prims[key]

    def gradnorms(self, source, *, p: float = 2) -> list[float | None]:
        from harness.scoring.primitives import gradnorms

        source = Source.of(source)
        key = self._key("gradnorm", source, p)
        if key not in self._prims:
            items, layout = self._encode(source, generate=False)
            bar = self._tqdm(len(items), f"{self.label} gradnorm {source.label()}")
            try:
                with self._timed("gradnorm", source, rows=len(items),
                                 tokens=sum(len(it["input_ids"]) for it in items)):
                    vals = sharded(lambda its, _: gradnorms(self.model, its, self.pad_id, p=p,
                                                            attention_mask=self.attention_mask, progress=bar),
                                   items, layout, batch_size=1, model=self.model)
            finally:
                if bar is not None:
                    bar.close()
            self._prims[key] = self._unflatten(vals, layout)
        return self._prims[key]

    # -------------------------------------------------------------- metrics
    def score(self, name: str, **args) -> Score:
        """Compute (once) metric ``name`` with ``args``; dependencies call this too."""
        key = (name, _freeze(args))
        if key in self._memo:
            return self._memo[key]
        metrics = self.registry.metrics
        if name not in metrics:
            from harness.tasks import suggest

            raise HarnessError(f"task '{self.task.name}': unknown metric '{name}'{suggest(name, metrics)}; "
                               f"see `harness ls metrics`")
        m = metrics[name]
        if name in self._stack:
            raise HarnessError(f"metric '{name}' depends on itself ({' -> '.join(self._stack)})")
        self._stack.append(name)
        try:
            result = m.fn(self, **args)
        except HarnessError:
            raise
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise HarnessError(f"task '{self.task.name}': metric '{name}': {exc}") from None
            raise self._metric_failed(name, exc) from exc
        except Exception as exc:  # a metric's bug reads as that metric's, not as a harness crash
            raise self._metric_failed(name, exc) from exc
        finally:
            self._stack.pop()
        if not isinstance(result, Score):
            raise HarnessError(f"metric '{name}' from plugin '{self._plugin_of(name)}' returned "
                               f"{type(result).__name__}, expected harness.metrics.Score")
        self._memo[key] = result
        if name not in self.scores:
            self.scores[name] = result
            self.metric_args[name] = dict(args)
        return result

    def _plugin_of(self, name: str) -> str:
        return getattr(self.registry, "sources", {}).get(("metrics", name), "?")

    def _metric_failed(self, name: str, exc: Exception) -> HarnessError:
        from harness.plugins import one_line

        return HarnessError(f"task '{self.task.name}': metric '{name}' from plugin '{self._plugin_of(name)}' "
                            f"failed: {one_line(exc)}")

    # ------------------------------------------------------------ reference
    def has_reference(self) -> bool:
        return self._reference_spec is not None

    def reference(self, metric: str):
        """The task's reference (a ``harness.scoring.reference.RetainReference``); an error names the fix."""
        if self._reference is None:
            if self._reference_spec is None:
                raise missing_reference_error(self.task.name, metric)
            if self._resolve_reference is None:
                self._reference = self._reference_spec  # already resolved by the caller
            else:
                self._reference = self._resolve_reference(self._reference_spec, self)
        return self._reference

    def reference_entry(self, key: str, *, metric: str) -> dict:
        """The reference's ``<BENCH>_EVAL.json`` entry ``key`` (computed for a retain model)."""
        return self.reference(metric).entry(key)

    def reference_model(self):
        return self.reference("mia_reference").load_model()
