"""Scoring a model on a task: the shared-pass evaluation engine and the open-unlearning export.

``EvalContext`` memoises the expensive primitives per (model, data source): one teacher-forced
forward pass per encoded sequence (answer NLL, token log-probs, argmax hits, Min-k++ z-scores)
and one greedy generation per prompt. ``forget_quality``, ``forget_truth_ratio``,
``forget_Q_A_Prob``, the MIA attacks and extraction strength therefore share forward passes.
Metric results are memoised too (``ctx.score(name)``), so every dependency of a metric lands in
``<BENCH>_EVAL.json`` exactly once, as in the reference's ``pre_compute`` cache.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from harness import HarnessError, __version__
from harness.io import write_json, write_jsonl
from harness.metrics import Score

log = logging.getLogger("harness")

ATTENTION_MASKS = ("reference", "corrected")
ARROWS = {"higher": "↑", "lower": "↓", "zero": "→0", "one": "→1"}


@dataclass(frozen=True)
class Source:
    """Which rows and how to encode them: one memoisation unit of forward passes.

    ``kind="qa"``: chat/QA item (spec 2.2) from the question column ``prompt`` and the answer
    column ``field`` (a list-valued column gives one sequence per option), with the rows of
    ``fewshot`` as in-context pairs. ``kind="text"``: completion item (spec 2.3) with the prefix
    column ``prompt`` (None or missing = empty prefix) and the text column ``field``.
    """

    role: str
    field: str = "answer"
    prompt: str | None = "question"
    kind: str = "qa"
    fewshot: str | None = None
    max_length: int = 512
    insert_space: bool = False

    @classmethod
    def of(cls, spec: Source | dict | str) -> Source:
        if isinstance(spec, Source):
            return spec
        if isinstance(spec, str):
            return cls(role=spec)
        if isinstance(spec, dict):
            names = {f.name for f in fields(cls)}
            bad = sorted(set(spec) - names)
            if bad:
                raise HarnessError(f"data source {spec}: unknown key(s) {bad}; valid: {sorted(names)}")
            return cls(**spec)
        raise HarnessError(f"data source must be a role name or a mapping, got {spec!r}")

    def label(self) -> str:
        return f"{self.role}.{self.field}"


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


class EvalContext:
    """Everything a metric function ``(ctx, **args) -> Score`` may read.

    ``task``, ``tokenizer``, ``template``, ``batch_size``, ``attention_mask`` (reference|corrected);
    data via ``rows(role)``; primitives via ``stats``, ``probability``, ``generations``,
    ``label_texts``, ``gradnorms``; other metrics via ``score(name, **args)``; the reference via
    ``reference_entry(key, metric=...)`` and ``reference_model()``.

    ``share=False`` disables sharing of primitives between metrics (each metric computes its own
    passes, like a naive implementation); it exists for the speed benchmark.
    """

    def __init__(self, task, model, tokenizer, template, *, reference=None, batch_size: int = 32,
                 attention_mask: str = "reference", limit: int | None = None, progress: bool = True,
                 registry=None, data_dir=None, share: bool = True, sort: bool = True,
                 reference_options: dict | None = None, label: str = "target", max_length: int | None = None):
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
        self.progress = progress
        self.data_dir = data_dir
        self.share = share
        self.sort = sort
        self.label = label  # names the model in progress bars
        self.max_length = max_length  # --max-length: caps every source's max_length
        self._registry = registry
        self._reference_spec = reference
        self._reference = None
        self._reference_options = reference_options or {}
        self._rows: dict[str, list[dict]] = {}
        self._prims: dict[tuple, Any] = {}
        self._memo: dict[tuple, Score] = {}
        self.scores: dict[str, Score] = {}  # by name, in order of completion (dependencies first)
        self.metric_args: dict[str, dict] = {}
        self._stack: list[str] = []

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
            from harness.data import load_split

            rows = load_split(self.task.data_spec(role), self.data_dir)
            self._rows[role] = rows[: self.limit] if self.limit else rows
        return self._rows[role]

    def _tqdm(self, total: int, desc: str):
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def _key(self, *parts) -> tuple:
        # the naive mode keys primitives by the metric being computed, so nothing is shared
        return parts if self.share else (*parts, tuple(self._stack[-1:]))

    def _encode(self, source: Source, generate: bool) -> tuple[list[dict], list]:
        """Encoded items (flat) and the per-row layout: an int (single) or list of ints (options)."""
        from harness.formatting import encode_qa, encode_text

        rows = self.rows(source.role)
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
                    it = encode_qa(self.tokenizer, self.template, q, t, fewshot=shots,
                                   max_length=max_length, generate=generate)
                elif source.kind == "text":
                    prefix = (row.get(source.prompt) or "") if source.prompt else ""
                    it = encode_text(self.tokenizer, prefix, t or "", max_length=max_length,
                                     insert_space=source.insert_space, generate=generate)
                else:
                    raise HarnessError(f"unknown data source kind {source.kind!r} (qa or text)")
                slots.append(len(items))
                items.append(it)
            layout.append(slots if multi else slots[0])
        from harness.modeling import check_lengths

        check_lengths(self.model, [len(it["input_ids"]) for it in items], getattr(self.model, "name_or_path", "") or "the model",
                      what=f"task '{self.task.name}' data role '{source.role}'")
        return items, layout

    def rows_all(self, role: str) -> list[dict]:
        """All rows of a role, ignoring ``limit`` (few-shot sets are prompts, not samples)."""
        from harness.data import load_split

        return load_split(self.task.data_spec(role), self.data_dir)

    @staticmethod
    def _unflatten(values: list, layout: list) -> list:
        return [[values[j] for j in slot] if isinstance(slot, list) else values[slot] for slot in layout]

    # ----------------------------------------------------------- primitives
    def stats(self, source, *, model: str = "target") -> list:
        """P1-P3 ``SeqStats`` per row (a list per row for list-valued answer columns)."""
        from harness.metrics.primitives import forward_stats

        source = Source.of(source)
        key = self._key("stats", model, source)
        if key not in self._prims:
            items, layout = self._encode(source, generate=False)
            m = self.model if model == "target" else self.reference_model()
            bar = self._tqdm(len(items), f"{self.label if model == 'target' else 'reference'} forward {source.label()}")
            try:
                vals = forward_stats(m, items, self.pad_id, batch_size=self.batch_size,
                                     attention_mask=self.attention_mask, sort=self.sort, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            self._prims[key] = self._unflatten(vals, layout)
        return self._prims[key]

    def probability(self, source, *, model: str = "target") -> list[dict]:
        """Per row ``{"prob", "avg_loss"}`` (lists for list-valued columns), the reference layout."""
        out = []
        for s in self.stats(source, model=model):
            if isinstance(s, list):
                out.append({"prob": [x.prob for x in s], "avg_loss": [x.avg_loss for x in s]})
            else:
                out.append({"prob": s.prob, "avg_loss": s.avg_loss})
        return out

    def generations(self, source, *, max_new_tokens: int = 200, stop=()) -> list[dict]:
        """P5 per row: ``{"input", "ground_truth", "generation"}`` (greedy, left padding)."""
        from harness.metrics.primitives import generate

        source = Source.of(source)
        key = self._key("gen", source, max_new_tokens, tuple(stop))
        if key not in self._prims:
            items, layout = self._encode(source, generate=True)
            if any(isinstance(s, list) for s in layout):
                raise HarnessError(f"generation needs one target per row; '{source.label()}' is a list column")
            bar = self._tqdm(len(items), f"{self.label} generate {source.label()}")
            try:
                vals = generate(self.model, self.tokenizer, items, batch_size=self.batch_size,
                                attention_mask=self.attention_mask, max_new_tokens=max_new_tokens,
                                stop=tuple(stop), sort=self.sort, progress=bar)
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
            from harness.metrics.primitives import decode

            # decode() with the tokenizer's own clean-up default, as the reference's zlib attack
            clean = bool(getattr(self.tokenizer, "clean_up_tokenization_spaces", False))
            texts = [decode(self.tokenizer, [t for t in it["labels"] if t != -100], clean_up=clean) for it in items]
            self._prims[key] = self._unflatten(texts, layout)
        return self._prims[key]

    def gradnorms(self, source, *, p: float = 2) -> list[float | None]:
        from harness.metrics.primitives import gradnorms

        source = Source.of(source)
        key = self._key("gradnorm", source, p)
        if key not in self._prims:
            items, layout = self._encode(source, generate=False)
            bar = self._tqdm(len(items), f"{self.label} gradnorm {source.label()}")
            try:
                vals = gradnorms(self.model, items, self.pad_id, p=p, attention_mask=self.attention_mask, progress=bar)
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
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise HarnessError(f"task '{self.task.name}': metric '{name}': {exc}") from None
            raise
        finally:
            self._stack.pop()
        if not isinstance(result, Score):
            raise HarnessError(f"metric '{name}' returned {type(result).__name__}, expected harness.metrics.Score")
        self._memo[key] = result
        if name not in self.scores:
            self.scores[name] = result
            self.metric_args[name] = dict(args)
        return result

    # ------------------------------------------------------------ reference
    def has_reference(self) -> bool:
        return self._reference_spec is not None

    def reference(self, metric: str):
        """The task's reference (a ``harness.reference.Reference``); an error names the fix."""
        if self._reference is None:
            from harness.reference import missing_reference_error, resolve_reference

            if self._reference_spec is None:
                raise missing_reference_error(self.task.name, metric)
            self._reference = resolve_reference(self._reference_spec, self)
        return self._reference

    def reference_entry(self, key: str, *, metric: str) -> dict:
        """The reference's ``<BENCH>_EVAL.json`` entry ``key`` (computed for a retain model)."""
        return self.reference(metric).entry(key)

    def reference_model(self):
        return self.reference("mia_reference").load_model()


# ------------------------------------------------------------------ export
def _plain(v):
    """JSON-safe: numpy scalars to float, NaN kept as in the reference's json.dump."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def export_entry(score: Score) -> dict:
    """One metric in the open-unlearning ``_EVAL.json`` layout."""
    e: dict[str, Any] = {"agg_value": _plain(score.value)}
    if score.per_sample is not None:
        e["value_by_index"] = {int(k): _plain(v) for k, v in score.per_sample.items()}
    for k, v in score.extra.items():
        e[k] = _plain(v)
    return e


def eval_log(scores: dict[str, Score]) -> dict:
    return {name: export_entry(s) for name, s in scores.items()}


def summary(scores: dict[str, Score], top: list[str]) -> dict:
    return {n: _plain(scores[n].value) for n in top if n in scores and scores[n].value is not None}


def sample_rows(scores: dict[str, Score]):
    """One samples.jsonl row per (metric, index) (and per MIA split), generations included."""
    for name, s in scores.items():
        if s.per_sample:
            for idx, v in s.per_sample.items():
                yield {"metric": name, "index": int(idx), **(v if isinstance(v, dict) else {"value": v})}
        for split in ("forget", "holdout"):
            sub = s.extra.get(split)
            if isinstance(sub, dict) and "value_by_index" in sub:
                for idx, v in sub["value_by_index"].items():
                    yield {"metric": name, "split": split, "index": int(idx), **v}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) or math.isnan(v):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def render_table(rows: list[tuple[str, Any, str]], *, title: str | None = None) -> str:
    """A plain-text results table: (metric, value, better) rows with better-direction arrows."""
    body = [(name, _fmt(value), ARROWS.get(better, "")) for name, value, better in rows]
    w = max([len("metric")] + [len(r[0]) for r in body])
    vw = max([len("value")] + [len(r[1]) for r in body])
    lines = [title] if title else []
    lines.append(f"{'metric':<{w}}  {'value':>{vw}}  better")
    lines.append(f"{'-' * w}  {'-' * vw}  ------")
    lines += [f"{n:<{w}}  {v:>{vw}}  {a}" for n, v, a in body]
    return "\n".join(lines)


def score_rows(scores: dict[str, Score], registry, top: list[str]) -> list[tuple[str, Any, str]]:
    """Table rows: top-level metrics first (task order), then their dependencies."""
    order = [n for n in top if n in scores] + [n for n in scores if n not in top]
    return [(n, scores[n].value, getattr(registry.metrics.get(n), "better", "")) for n in order]


def write_outputs(out_dir: Path, task, scores: dict[str, Score], registry, top: list[str], *,
                  model_label: str, partial: bool, settings: dict, identity: dict | None = None) -> None:
    """samples.jsonl, <BENCH>_EVAL.json, <BENCH>_SUMMARY.json, then scores.json (completion marker)."""
    out_dir = Path(out_dir)
    bench = task.benchmark
    write_jsonl(out_dir / "samples.jsonl", sample_rows(scores))
    write_json(out_dir / f"{bench}_EVAL.json", eval_log(scores), indent=4, sort_keys=True)
    write_json(out_dir / f"{bench}_SUMMARY.json", summary(scores, top), indent=4, sort_keys=True)
    metrics = {}
    for n, s in scores.items():
        m = registry.metrics.get(n)
        metrics[n] = {"value": _plain(s.value), "better": getattr(m, "better", None),
                      "version": getattr(m, "version", None), "top_level": n in top}
    write_json(out_dir / "scores.json", {"task": task.name, "task_version": task.version, "model": model_label,
                                         **(identity or {}), "partial": partial, "eval": settings, "metrics": metrics})


def evaluate_task(task, model, tokenizer, template, *, reference=None, out_dir=None, batch_size: int = 32,
                  limit: int | None = None, metrics=None, progress: bool = True,
                  attention_mask: str = "reference", registry=None, data_dir=None,
                  model_label: str | None = None, print_table: bool = True, share: bool = True,
                  sort: bool = True, reference_options: dict | None = None,
                  max_length: int | None = None, identity: dict | None = None) -> dict[str, Score]:
    """Score ``model`` on ``task``'s metric suite (or ``metrics``: names or (name, args) pairs).

    ``reference``: a retain model directory / hub id, an ``*_EVAL.json`` or ``*_SUMMARY.json`` log,
    or a ``harness.reference.Reference``; needed only by metrics that declare ``needs_reference``.
    Returns every computed Score by name (dependencies included); with ``out_dir`` writes the
    result files, ``scores.json`` last. ``share=False`` / ``sort=False`` switch off pass sharing and
    length-sorted batching (only for measuring what they save; the numbers stay the same).
    """
    t0 = time.perf_counter()
    ctx = EvalContext(task, model, tokenizer, template, reference=reference, batch_size=batch_size,
                      attention_mask=attention_mask, limit=limit, progress=progress, registry=registry,
                      data_dir=data_dir, share=share, sort=sort, reference_options=reference_options,
                      max_length=max_length)
    wanted = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in (metrics or task.metrics)]
    reg = ctx.registry
    for name, _ in wanted:
        if name not in reg.metrics:
            from harness.tasks import suggest

            raise HarnessError(f"task '{task.name}': unknown metric '{name}'{suggest(name, reg.metrics)}; "
                               "see `harness ls metrics`")
        if reg.metrics[name].needs_reference and reference is None:
            from harness.reference import missing_reference_error

            raise missing_reference_error(task.name, name)
    was_training = model.training
    model.eval()
    try:
        for name, args in wanted:
            ctx.score(name, **args)
    finally:
        model.train(was_training)
    top = [n for n, _ in wanted]
    if out_dir is not None:
        settings = {"batch_size": batch_size, "attention_mask": attention_mask, "limit": limit,
                    "harness_version": __version__, "template": _template_dict(template),
                    "reference": ctx._reference.describe() if ctx._reference is not None else None,
                    "seconds": round(time.perf_counter() - t0, 1)}
        write_outputs(Path(out_dir), task, ctx.scores, reg, top, model_label=model_label or "model",
                      partial=bool(limit), settings=settings, identity=identity)
    if print_table:
        print(render_table(score_rows(ctx.scores, reg, top), title=f"{task.name} ({model_label or 'model'})"))
    return dict(ctx.scores)


def _template_dict(template) -> dict | None:
    if template is None:
        return None
    try:
        return asdict(template)
    except TypeError:
        return dict(vars(template))


# ---------------------------------------------------------------- harness eval
def main(args) -> int:
    """``harness eval``: score a checkpoint (profile, hub id or directory) on the selected tasks."""
    score(args)
    return 0


def score(args) -> dict[str, Path]:
    """Score the selected tasks; returns each task's run directory (finished now, earlier, or by another process)."""
    from harness.io import config_hash
    from harness.modeling import check_checkpoint, load_model, load_tokenizer
    from harness.plugins import get_registry
    from harness.profiles import check_reference_placeholder, finalize_template, resolve_model
    from harness.results import claim, is_complete, write_config
    from harness.tasks import select

    reg = get_registry(plugins_dirs=getattr(args, "plugins_dir", None) or (),
                       include_tasks=getattr(args, "include_tasks", None) or ())
    names = select(args.tasks, reg.tasks, kind="task", tags_of=lambda t: t.tag, failures=reg.failures)
    check_reference_placeholder(getattr(args, "reference", None), len(names))
    attention_mask = getattr(args, "attention_mask", None) or "reference"
    limit = getattr(args, "limit", None)
    batch_size = getattr(args, "batch_size", None) or 32
    loaded: dict[tuple, tuple] = {}
    dirs: dict[str, Path] = {}
    for tname in names:
        task = reg.tasks[tname]
        choice = resolve_model(getattr(args, "model", None), task, template_file=getattr(args, "template", None),
                               reference=getattr(args, "reference", None),
                               retain=bool(getattr(args, "retain_model", False)))
        key = (choice.start, choice.tokenizer, choice.dtype)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            trc = bool(getattr(args, "trust_remote_code", False))
            tok = load_tokenizer(choice.tokenizer, trust_remote_code=trc)
            dtype = choice.dtype if choice.dtype != "auto" else _auto_dtype(choice.start)
            loaded[key] = (load_model(choice.start, dtype=dtype, trust_remote_code=trc, device=_device()), tok, dtype)
            check_checkpoint(loaded[key][0], tok, choice.start)
        model, tok, dtype = loaded[key]
        template = finalize_template(choice, tok)
        config = {"task": task.to_config(), "model": choice.to_config(), "template": _template_dict(template),
                  "eval": {"batch_size": batch_size, "attention_mask": attention_mask, "limit": limit, "dtype": dtype,
                           "max_length": getattr(args, "max_length", None),
                           "metric_versions": {n: reg.metrics[n].version for n, _ in task.metrics if n in reg.metrics}}}
        out = Path(args.output) / choice.label / task.name / (getattr(args, "name", None) or "eval") / f"{config_hash(config)}-s0"
        dirs[task.name] = out
        if is_complete(out) and not getattr(args, "overwrite", False):
            print(f"{task.name}: results exist in {out} (use --overwrite to recompute)")
            _print_existing(out, reg)
            continue
        with claim(out) as mine:
            if not mine:
                print(f"{task.name}: another process is scoring {out}; skipped")
                continue
            write_config(out, config)
            evaluate_task(task, model, tok, template, reference=choice.reference, out_dir=out, batch_size=batch_size,
                          limit=limit, attention_mask=attention_mask, registry=reg,
                          data_dir=getattr(args, "data_dir", None), model_label=choice.label,
                          max_length=getattr(args, "max_length", None),
                          identity=_eval_identity(getattr(args, "name", None) or "eval"), reference_options={"dtype": dtype, "trust_remote_code": bool(getattr(args, "trust_remote_code", False))})
            print(f"results: {out}")
    return dirs


def _eval_identity(name: str) -> dict:
    """What an eval run is in the results tree: the row name (finetuned, retain, ...) and seed 0."""
    return {"method": name, "method_display": {"finetuned": "Finetuned", "retain": "Retain"}.get(name, name), "seed": 0}


def _print_existing(out: Path, reg) -> None:
    import json

    doc = json.loads((out / "scores.json").read_text())
    rows = [(n, m["value"], m.get("better") or "") for n, m in doc["metrics"].items()]
    rows.sort(key=lambda r: not doc["metrics"][r[0]].get("top_level", False))
    print(render_table(rows, title=f"{doc['task']} ({doc['model']})"))


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _auto_dtype(path: str) -> str:
    """A local checkpoint keeps the dtype it was saved in (config.json ``dtype``/``torch_dtype``)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return "float32"
    dt = d.get("dtype") or d.get("torch_dtype") or "float32"
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"
