"""``results_<timestamp>.json`` in lm-evaluation-harness's (0.4.x) results layout, beside ``scores.json``, so
tools that read lm-eval results (leaderboards, comparison scripts, ``lm_eval.utils`` readers) read ours.

lm-eval keys each metric as ``"<metric>,<filter>"``; we have no filters, so every key ends in ``,none``
(lm-eval's name for "no filter"), and ``"<metric>_stderr,none"`` is ``"N/A"`` as lm-eval writes for a
metric without a standard error. ``higher_is_better`` is true/false for higher/lower-is-better metrics
and null for metrics best at a target value (privleak: 0), which lm-eval's booleans cannot say.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime
from pathlib import Path

from harness.io import write_json

HIGHER = {"higher": True, "lower": False}


def results_name(when: datetime | None = None) -> str:
    """lm-eval's file name: ``results_`` + local ISO time with ``:`` replaced by ``-``."""
    return f"results_{(when or datetime.now()).isoformat().replace(':', '-')}.json"


def _sha(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None


def _token(tokenizer, kind: str) -> list:
    tok = getattr(tokenizer, f"{kind}_token", None)
    tid = getattr(tokenizer, f"{kind}_token_id", None)
    return [tok, None if tid is None else str(tid)]  # lm-eval writes the id as a string


def lm_eval_results(task, metrics: dict[str, dict], *, run: dict, tokenizer=None, n_samples: int | None = None,
                    partial: bool = False, started: float | None = None, start_wall: float | None = None) -> dict:
    """The lm-eval results document of one scored task.

    ``metrics``: ``scores.json``'s ``metrics`` (``value``, ``better``, ``version``); ``run``: ``model_args``
    (lm-eval's ``key=value,...`` string), ``model_name``, ``git_hash``, ``batch_size``, ``device``, ``dtype``,
    ``limit``, ``seed``, ``versions`` and anything else to keep under ``config``.
    """
    name = task.name
    row: dict = {"name": name, "alias": name, "sample_len": n_samples}
    for metric, m in metrics.items():
        row[f"{metric},none"] = m.get("value")
        row[f"{metric}_stderr,none"] = "N/A"
    first = next(iter(task.data.values()), None)
    seed = run.get("seed", 0)
    versions = run.get("versions") or {}
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not isinstance(chat_template, str):
        chat_template = None
    model_name = run.get("model_name") or ""
    end = time.perf_counter()  # lm-eval's clock for total_evaluation_time_seconds
    doc = {
        "results": {name: row},
        "group_subtasks": {},
        "configs": {name: {
            "task": name, "tag": list(task.tag),
            "dataset_path": first.path if first else None, "dataset_name": first.name if first else None,
            "test_split": first.split if first else None, "output_type": "generate_until", "num_fewshot": 0,
            "metric_list": [{"metric": n, "higher_is_better": HIGHER.get(m.get("better"))} for n, m in metrics.items()],
            "metadata": {"version": task.version, "benchmark": task.benchmark,
                         "metric_versions": {n: m.get("version") for n, m in metrics.items()}},
        }},
        "versions": {name: task.version},
        "n-shot": {name: 0},
        "higher_is_better": {name: {n: HIGHER.get(m.get("better")) for n, m in metrics.items()}},
        "n-samples": {name: {"original": None if partial else n_samples, "effective": n_samples}},
        "config": {
            "model": "hf", "model_args": run.get("model_args", ""),
            "model_num_parameters": run.get("model_num_parameters"), "model_dtype": run.get("dtype"),
            "model_revision": "main", "model_sha": "", "batch_size": run.get("batch_size"), "batch_sizes": [],
            "device": run.get("device"), "use_cache": None, "limit": run.get("limit"), "bootstrap_iters": 0,
            "gen_kwargs": None, "random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": seed,
            **{k: v for k, v in run.items() if k not in ("model_args", "model_name", "git_hash", "versions")},
        },
        "git_hash": run.get("git_hash"),
        "date": start_wall if start_wall is not None else time.time(),
        "pretty_env_info": "; ".join(f"{k} {v}" for k, v in versions.items() if v),
        "transformers_version": versions.get("transformers"),
        "lm_eval_version": None,  # written by unlearn-harness, not by lm-eval
        "harness_version": versions.get("harness"),
        "upper_git_hash": None,
        "tokenizer_pad_token": _token(tokenizer, "pad"),
        "tokenizer_eos_token": _token(tokenizer, "eos"),
        "tokenizer_bos_token": _token(tokenizer, "bos"),
        "eot_token_id": getattr(tokenizer, "eos_token_id", None),
        "max_length": run.get("max_length"),
        "task_hashes": {},
        "model_source": "hf",
        "model_name": model_name,
        "model_name_sanitized": re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model_name),  # as lm-eval sanitizes
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": False,
        "chat_template": chat_template,
        "chat_template_sha": _sha(chat_template),
        "total_evaluation_time_seconds": str(end - started) if started is not None else None,
    }
    return doc


def n_samples_of(scores: dict) -> int | None:
    """The number of examples scored: the largest per-sample count among the metrics."""
    counts = [len(s.per_sample) for s in scores.values() if getattr(s, "per_sample", None)]
    return max(counts) if counts else None


def write_lm_eval(out_dir: Path, doc: dict) -> Path:
    """Write ``doc`` as the directory's only ``results_*.json`` (one left by an unfinished attempt goes)."""
    for old in Path(out_dir).glob("results_*.json"):
        old.unlink(missing_ok=True)
    path = Path(out_dir) / results_name()
    write_json(path, doc, indent=2)
    return path
