"""The reference a task's forget_quality and privleak are measured against (spec 6.2, 7).

A reference is one of:
- a retain model (directory, hub id or ``tiny:<kind>``): scored once with the same code, data,
  template and settings as the evaluated model, and cached under
  ``$HARNESS_HOME/references/<hash>/`` keyed by the model's content hash, the task, the template,
  the tokenizer, the settings and the harness version;
- an open-unlearning ``*_EVAL.json`` log (or a directory holding one): ``forget_truth_ratio``
  per-sample scores for the KS test, ``mia_min_k`` AUC for privleak;
- for privleak alone, a ``*_SUMMARY.json`` holding ``mia_min_k``.

Shipped logs of the published retain models live in ``harness/bundled/reference_logs``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import SCORING_VERSION, HarnessError
from harness.fingerprint import fingerprint
from harness.io import config_hash, write_json
from harness.paths import bundled_dir, harness_home
from harness.scoring.context import EvalContext
from harness.scoring.export import eval_log
from harness.scoring.shard import agree, is_writer

BUNDLED_LOGS = bundled_dir() / "reference_logs"


@dataclass
class RetainReference:
    """A loaded reference. ``entry(key)`` returns the ``_EVAL.json`` entry of metric ``key``."""

    origin: str                       # what the user gave (path, id), for messages
    kind: str                         # log | summary | model
    logs: dict = field(default_factory=dict)
    path: Path | None = None          # the log file (log/summary) or the cache file (model)
    model_path: str | None = None     # retain model, when kind == "model"
    _ctx: Any = None                  # the EvalContext whose settings a model reference follows
    _model: Any = None
    _key: str | None = None

    def describe(self) -> dict:
        d = {"kind": self.kind, "origin": self.origin}
        if self.path is not None:
            d["path"] = str(self.path)
        if self._key:
            d["cache_key"] = self._key
        return d

    def entry(self, key: str) -> dict:
        if key not in self.logs and self.kind == "model":
            self._score(key)
        if key not in self.logs:
            raise HarnessError(f"reference {self.kind} {self.path or self.origin} has no '{key}' entry; "
                               f"it has {sorted(self.logs) or 'nothing'} (use an *_EVAL.json of the retain model "
                               f"that includes '{key}', or the retain model itself)")
        e = self.logs[key]
        if not isinstance(e, dict):
            e = {"agg_value": e}  # a *_SUMMARY.json maps names to bare numbers
        return e

    def per_sample(self, key: str, field_name: str = "score") -> list[float]:
        """``value_by_index[*][field_name]`` of entry ``key`` in index order (for the KS test).

        A log must cover the rows this run scored (with ``--limit``, at least those; without it, exactly
        the split's rows): a log of another split or a truncated one would give a wrong p-value silently."""
        e = self.entry(key)
        vbi = e.get("value_by_index")
        where = f"reference {self.kind} {self.path or self.origin}"
        if not vbi:
            raise HarnessError(f"{where}: '{key}' has no per-sample values (value_by_index); forget_quality "
                               "needs the retain model's *_EVAL.json, not a summary")
        subset = self._ctx.subset if (self.kind == "log" and self._ctx is not None) else None
        if subset:  # held-out rows of an attack: the log's values of exactly those rows (all roles share them)
            rows = next(iter(subset.values()))
            missing = [i for i in rows if str(i) not in vbi and i not in vbi]
            if missing:
                raise HarnessError(f"{where}: '{key}' has no values for rows {missing[:5]} of the held-out rows")
            vbi = {str(i): vbi.get(str(i), vbi.get(i)) for i in rows}
        out = []
        for idx in sorted(vbi, key=int):
            v = vbi[idx]
            v = v.get(field_name) if isinstance(v, dict) else v
            out.append(_number(v, f"{where}: '{key}' value_by_index[{idx}].{field_name}"))
        own = self._ctx.scores.get(key) if (self.kind == "log" and self._ctx is not None) else None
        if own is not None and own.per_sample:
            mine, theirs = {int(i) for i in own.per_sample}, {int(i) for i in vbi}
            if subset:
                theirs = set(range(len(theirs)))  # the context numbers the held-out rows 0..k-1
            if not mine <= theirs or (self._ctx.limit is None and mine != theirs):
                raise HarnessError(f"{where}: '{key}' has {len(theirs)} samples but task '{self._ctx.task.name}' "
                                   f"scored {len(mine)} rows{' (--limit)' if self._ctx.limit else ''}: the log is "
                                   "of another split or incomplete; pass the *_EVAL.json of this task's retain model")
        return out

    def auc(self, key: str = "mia_min_k") -> float:
        e = self.entry(key)
        v = e.get("auc", e.get("agg_value"))
        if v is None:
            raise HarnessError(f"reference {self.kind} {self.path or self.origin}: '{key}' has no auc/agg_value")
        return _number(v, f"reference {self.kind} {self.path or self.origin}: '{key}' auc")

    # ---------------------------------------------------------------- model references
    def load_model(self):
        if self.kind != "model":
            raise HarnessError(f"this metric needs the reference *model* (e.g. mia_reference), but the reference "
                               f"is a {self.kind} ({self.path or self.origin}); pass --reference with the retain "
                               "model directory or hub id")
        if self._model is None:
            from harness.models.load import load_model

            ctx = self._ctx
            opts = ctx._reference_options
            target = ctx.model
            dtype = opts.get("dtype") or _dtype_name(target)
            m = load_model(self.model_path, dtype=dtype, trust_remote_code=bool(opts.get("trust_remote_code")))
            self._model = m.to(next(target.parameters()).device).eval()
        return self._model

    def _score(self, key: str) -> None:
        ctx = self._ctx
        rctx = EvalContext(ctx.task, self.load_model(), ctx.tokenizer, ctx.template, reference=None,
                           batch_size=ctx.batch_size, attention_mask=ctx.attention_mask, limit=ctx.limit,
                           progress=ctx.progress, registry=ctx.registry, data_dir=ctx.data_dir,
                           label="reference", resolve_reference=None, timings=ctx.timings,
                           shared_prefix=ctx.shared_prefix, subset=ctx.subset)
        if ctx.registry.metrics.get(key) is not None and ctx.registry.metrics[key].needs_reference:
            raise HarnessError(f"metric '{key}' cannot be scored on the reference model itself (it needs a reference)")
        rctx.score(key)
        self.logs.update(eval_log(rctx.scores))
        if is_writer():  # every rank holds the same logs; one writes the cache (atomically)
            write_json(self.path, self.logs, indent=4, sort_keys=True)


def _dtype_name(model) -> str:
    import torch

    dt = next(model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "float32")


_LOG_NAME = re.compile(r"^(?P<bench>[A-Za-z0-9]+)_(EVAL|SUMMARY)\.json$")


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HarnessError(f"{where}: expected a number, got {json.dumps(v)[:40]}")
    if not math.isfinite(v):
        raise HarnessError(f"{where}: expected a finite number, got {v}")
    return float(v)


def _check_values(path: Path, doc: dict) -> None:
    """Every number in the log is a finite number (``null`` is rejected only where a value is used)."""
    for key, e in doc.items():
        if not isinstance(e, dict):
            if e is not None:
                _number(e, f"reference log {path}: '{key}'")
            continue
        for f in ("agg_value", "auc"):
            if e.get(f) is not None:
                _number(e[f], f"reference log {path}: '{key}' {f}")
        vbi = e.get("value_by_index")
        if vbi is None:
            continue
        if not isinstance(vbi, dict):
            raise HarnessError(f"reference log {path}: '{key}' value_by_index must map row indices to values")
        for idx, v in vbi.items():
            if not str(idx).isdigit():
                raise HarnessError(f"reference log {path}: '{key}' value_by_index has a non-integer index {idx!r}")
            for name, x in (v.items() if isinstance(v, dict) else [("value", v)]):
                # open-unlearning logs keep texts (generation, ground_truth) next to the scores
                if x is not None and (name in ("score", "value") or not isinstance(x, (list, dict, str))):
                    _number(x, f"reference log {path}: '{key}' value_by_index[{idx}].{name}")


def load_log(path: Path, origin: str | None = None, *, benchmark: str | None = None) -> RetainReference:
    """Read and check a reference log; ``benchmark``: the task's (a log named for another is an error)."""
    path = Path(path)
    m = _LOG_NAME.match(path.name)
    if benchmark and m and m["bench"] != benchmark:
        raise HarnessError(f"reference log {path} is a {m['bench']} log but the task is a {benchmark} task; "
                           f"pass the {benchmark}_EVAL.json of the task's retain model")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HarnessError(f"reference log {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise HarnessError(f"reference log {path}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HarnessError(f"reference log {path}: expected a JSON object of metric entries")
    _check_values(path, doc)
    is_summary = path.name.endswith("_SUMMARY.json") or all(not isinstance(v, dict) for v in doc.values())
    return RetainReference(origin=origin or str(path), kind="summary" if is_summary else "log", logs=doc, path=path)


def reference_log_file(spec: str, benchmark: str) -> Path | None:
    """The log file a reference string names (a file, or a directory holding ``<BENCH>_EVAL.json`` /
    ``<BENCH>_SUMMARY.json``); None for a model reference."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        for name in (f"{benchmark}_EVAL.json", f"{benchmark}_SUMMARY.json"):
            if (p / name).is_file():
                return p / name
    return None


def check_reference(spec: str | None, task) -> None:
    """Before any work: a log reference must read, fit the task's benchmark and hold finite numbers."""
    if not spec:
        return
    f = reference_log_file(str(spec), task.benchmark)
    if f is not None:
        load_log(f, str(spec), benchmark=task.benchmark)
    elif str(spec).endswith(".json") and not Path(spec).expanduser().exists():
        raise HarnessError(f"--reference {spec}: file not found")


def resolve_reference(spec, ctx) -> RetainReference:
    """Turn ``spec`` (Reference, log file, directory, hub id, ``tiny:<kind>``) into a Reference."""
    if isinstance(spec, RetainReference):
        if spec.kind == "model" and spec._ctx is None:
            spec._ctx = ctx
        return spec
    s = str(spec)
    p = Path(s).expanduser()
    bench = ctx.task.benchmark
    log_file = reference_log_file(s, bench)
    if log_file is not None:
        ref = load_log(log_file, s, benchmark=bench)
        ref._ctx = ctx  # per_sample() compares the log's rows with the rows this context scored
        return ref
    if p.is_dir():
        if (p / "config.json").is_file():
            return _model_reference(s, str(p), ctx)
        raise HarnessError(f"--reference {s}: directory holds neither a model (config.json) nor "
                           f"{bench}_EVAL.json / {bench}_SUMMARY.json")
    if s.endswith(".json"):
        raise HarnessError(f"--reference {s}: file not found")
    if s.startswith("tiny:"):
        from harness.models.profiles import checkpoint_path

        return _model_reference(s, checkpoint_path(s), ctx)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return _model_reference(s, s, ctx)  # hub id
    raise HarnessError(f"--reference {s}: not a log file, a directory or a hub id (org/name)")


def _model_reference(origin: str, path: str, ctx) -> RetainReference:
    key = reference_cache_key(path, ctx)
    cache = harness_home() / "references" / key / f"{ctx.task.benchmark}_EVAL.json"
    logs = {}
    if cache.is_file():
        try:
            logs = json.loads(cache.read_text(encoding="utf-8"))
        except ValueError:
            logs = {}  # a torn cache file is recomputed
    logs = agree(logs)  # every rank scores the same missing entries (the cache may appear meanwhile)
    return RetainReference(origin=origin, kind="model", logs=logs, path=cache, model_path=path, _ctx=ctx, _key=key)


def reference_cache_key(model_path: str, ctx) -> str:
    """Content hash of the retain model + everything that changes its scores."""
    from dataclasses import asdict

    reg = ctx.registry
    tmpl = ctx.template
    try:
        tmpl = asdict(tmpl)
    except TypeError:
        tmpl = vars(tmpl) if tmpl is not None else None
    cfg = {"model": model_content_hash(model_path), "task": ctx.task.to_config(), "template": tmpl,
           "tokenizer": tokenizer_fingerprint(ctx.tokenizer), "attention_mask": ctx.attention_mask,
           "limit": ctx.limit, **({"subset": ctx.subset} if ctx.subset else {}), "dtype": ctx._reference_options.get("dtype"), "scoring_version": SCORING_VERSION,
           "metric_versions": {n: m.version for n, m in sorted(reg.metrics.items())}}
    return config_hash(cfg, n=16)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
                       getattr(tokenizer, "chat_template", None)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_content_hash(path: str) -> str:
    """Content fingerprint of a model directory (a hub id is identified by its name)."""
    p = Path(path)
    if not p.is_dir():
        return "id:" + str(path)
    return fingerprint(p)


def bundled_log(name: str) -> Path:
    """Path of a shipped reference log, e.g. ``tofu_Llama-2-7b-chat-hf_retain90/TOFU_EVAL.json``."""
    p = BUNDLED_LOGS / name
    if not p.is_file():
        avail = sorted(str(q.relative_to(BUNDLED_LOGS)) for q in BUNDLED_LOGS.rglob("*.json"))
        raise HarnessError(f"no shipped reference log '{name}'; available: {', '.join(avail)}")
    return p

