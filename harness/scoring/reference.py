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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import HarnessError, __version__
from harness.io import config_hash, write_json
from harness.paths import bundled_dir, harness_home
from harness.scoring.context import EvalContext
from harness.scoring.export import eval_log

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
        """``value_by_index[*][field_name]`` of entry ``key`` in index order (for the KS test)."""
        e = self.entry(key)
        vbi = e.get("value_by_index")
        if not vbi:
            raise HarnessError(f"reference {self.kind} {self.path or self.origin}: '{key}' has no per-sample "
                               f"values (value_by_index); forget_quality needs the retain model's *_EVAL.json, "
                               f"not a summary")
        out = []
        for idx in sorted(vbi, key=int):
            v = vbi[idx]
            v = v.get(field_name) if isinstance(v, dict) else v
            if v is not None:
                out.append(float(v))
        return out

    def auc(self, key: str = "mia_min_k") -> float:
        e = self.entry(key)
        v = e.get("auc", e.get("agg_value"))
        if v is None:
            raise HarnessError(f"reference {self.kind} {self.path or self.origin}: '{key}' has no auc/agg_value")
        return float(v)

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
                           label="reference", resolve_reference=None)
        if ctx.registry.metrics.get(key) is not None and ctx.registry.metrics[key].needs_reference:
            raise HarnessError(f"metric '{key}' cannot be scored on the reference model itself (it needs a reference)")
        rctx.score(key)
        self.logs.update(eval_log(rctx.scores))
        write_json(self.path, self.logs, indent=4, sort_keys=True)


def _dtype_name(model) -> str:
    import torch

    dt = next(model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "float32")


def load_log(path: Path, origin: str | None = None) -> RetainReference:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HarnessError(f"reference log {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise HarnessError(f"reference log {path}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HarnessError(f"reference log {path}: expected a JSON object of metric entries")
    is_summary = path.name.endswith("_SUMMARY.json") or all(not isinstance(v, dict) for v in doc.values())
    return RetainReference(origin=origin or str(path), kind="summary" if is_summary else "log", logs=doc, path=path)


def resolve_reference(spec, ctx) -> RetainReference:
    """Turn ``spec`` (Reference, log file, directory, hub id, ``tiny:<kind>``) into a Reference."""
    if isinstance(spec, RetainReference):
        if spec.kind == "model" and spec._ctx is None:
            spec._ctx = ctx
        return spec
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_file():
        return load_log(p, s)
    if p.is_dir():
        if (p / "config.json").is_file():
            return _model_reference(s, str(p), ctx)
        bench = ctx.task.benchmark
        for name in (f"{bench}_EVAL.json", f"{bench}_SUMMARY.json"):
            if (p / name).is_file():
                return load_log(p / name, s)
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
           "limit": ctx.limit, "dtype": ctx._reference_options.get("dtype"), "harness": __version__,
           "metric_versions": {n: m.version for n, m in sorted(reg.metrics.items())}}
    return config_hash(cfg, n=16)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
                       getattr(tokenizer, "chat_template", None)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_content_hash(path: str) -> str:
    """sha256 over a model directory's files (a hub id hashes as its name).

    Per-file digests are cached by (path, size, mtime) so a 16 GB checkpoint is read once.
    """
    p = Path(path)
    if not p.is_dir():
        return "id:" + str(path)
    index_file = harness_home() / "references" / "file_hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    h = hashlib.sha256()
    changed = False
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        k = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        d = index.get(k)
        if d is None:
            fh = hashlib.sha256()
            with open(f, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    fh.update(block)
            d = index[k] = fh.hexdigest()
            changed = True
        h.update(f"{f.relative_to(p)}\0{d}\n".encode())
    if changed:
        try:
            write_json(index_file, index)
        except OSError:
            pass  # a read-only cache only costs a rehash next time
    return h.hexdigest()


def bundled_log(name: str) -> Path:
    """Path of a shipped reference log, e.g. ``tofu_Llama-2-7b-chat-hf_retain90/TOFU_EVAL.json``."""
    p = BUNDLED_LOGS / name
    if not p.is_file():
        avail = sorted(str(q.relative_to(BUNDLED_LOGS)) for q in BUNDLED_LOGS.rglob("*.json"))
        raise HarnessError(f"no shipped reference log '{name}'; available: {', '.join(avail)}")
    return p

