"""``lm_eval``: lm-evaluation-harness tasks scored on the in-memory model (spec 6.5).

The live model and tokenizer are wrapped in ``lm_eval.models.huggingface.HFLM`` (no save and reload: same
weights, dtype and device as the rest of the scoring) and every task of the ``tasks`` argument is run with
one ``simple_evaluate`` call, as the reference's ``LMEvalEvaluator`` does. Results:

- scores.json: one entry per ``"<task>/<metric>"`` with its lm-eval ``stderr`` and direction (a group such
  as ``mmlu`` gives its group-level entries; the ``,none`` filter suffix is stripped, other filters stay as
  ``metric,filter``; lm-eval's ``name``/``sample_len``/``alias`` fields are not metrics and are left out);
- ``LMEval_EVAL.json``: ``{task: results["samples"]}``; ``LMEval_SUMMARY.json``: ``{"task/metric": value}``
  with the ``_stderr`` entries, as the reference writes them; samples.jsonl: one row per lm-eval sample.

Unlike the reference, ``batch_size``, ``apply_chat_template`` and ``system_instruction`` are applied (the
reference reads them from the wrong place, so it always ran with batch 1 and no chat template).
``batch_size`` defaults to the scoring batch (``--eval-batch-size``) and ``limit`` to ``--limit``.
``include_path``: directories of lm-eval task YAML files of your own (lm-eval's custom-task format),
relative to the task file; custom tasks are looked up without scanning lm-eval's built-in index first
(that scan takes ~20 s on a small machine).

lm-eval is an optional dependency: ``pip install 'unlearn-harness[lmeval]'``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from harness import HarnessError, hookimpl
from harness.metrics import Score, metric

EXTRA = "lmeval"
EXPORT = "LMEval"  # LMEval_EVAL.json / LMEval_SUMMARY.json, the reference evaluator's name
ARGS = ("tasks", "num_fewshot", "limit", "batch_size", "apply_chat_template", "system_instruction",
        "fewshot_as_multiturn", "include_path", "bootstrap_iters")
_MANAGERS: dict[tuple, object] = {}

METRICS: list = []


def require() -> str:
    """lm-eval's version; a one-line error naming the extra when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise HarnessError(f"metric 'lm_eval' needs the lm-eval package, which is not installed: "
                           f"pip install 'unlearn-harness[{EXTRA}]' (or pip install lm-eval)") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


def installed_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return None


def task_manager(include_paths: tuple[str, ...], names: list[str]):
    """A ``TaskManager`` that knows ``names``: the include paths alone when they define all of them,
    else with lm-eval's built-in tasks too (cached per process)."""
    from lm_eval.tasks import TaskManager

    def get(defaults: bool):
        key = (include_paths, defaults)
        if key not in _MANAGERS:
            with _quiet():
                _MANAGERS[key] = TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)
        return _MANAGERS[key]

    if include_paths:
        tm = get(False)
        if all(n in tm.all_tasks for n in names):
            return tm
    return get(True)


@contextlib.contextmanager
def _quiet():
    # lm-eval warns about every pre-built model and index detail; a run shows only its errors
    lg = logging.getLogger("lm_eval")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise HarnessError(f"metric 'lm_eval': 'tasks' must name at least one lm-eval task, got {tasks!r} "
                           "(task YAML: {name: lm_eval, tasks: [mmlu]}, or --lm-eval-tasks / --utility)")
    return list(dict.fromkeys(tasks))


def _include_paths(ctx, include_path) -> tuple[str, ...]:
    if include_path is None:
        return ()
    paths = [include_path] if isinstance(include_path, str) else list(include_path)
    base = Path(getattr(ctx.task, "file", ".")).parent
    out = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else base / p
        if not full.is_dir():
            raise HarnessError(f"metric 'lm_eval' of task '{ctx.task.name}': include_path {p} is not a directory "
                               f"(looked for {full})")
        out.append(str(full.resolve()))
    return tuple(out)


def _load(tm, name: str, task: str):
    """The lm-eval task or group object of ``name`` (building it reads its dataset)."""
    from harness.tasks import suggest

    if name not in tm.all_tasks:
        raise HarnessError(f"metric 'lm_eval' of task '{task}': unknown lm-eval task '{name}'"
                           f"{suggest(name, tm.all_tasks)}; see `lm-eval ls tasks`, or pass a directory of "
                           "your own task YAML files as include_path / --lm-eval-include")
    try:
        with _quiet():
            loaded = tm.load([name])
    except Exception as exc:
        from harness.plugins import one_line

        raise HarnessError(f"lm-eval task '{name}' (metric 'lm_eval' of task '{task}'): its data could not be loaded "
                           f"({one_line(exc)[:200]}); the dataset must be in the Hugging Face datasets cache or "
                           "the hub reachable (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), or use a local "
                           "custom task (include_path)") from None
    return loaded["groups"].get(name) or loaded["tasks"][name]


def _entries(res: dict, name: str) -> dict:
    # a group (mmlu) reports its group-level entries, a task its own (the reference's summarize)
    return (res.get("groups") or {}).get(name) or (res.get("results") or {}).get(name) or {}


def _metric_name(key: str) -> str:
    return key[: -len(",none")] if key.endswith(",none") else key


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it did not compute


def parts_of(res: dict, name: str) -> tuple[dict[str, Score], dict]:
    """scores.json parts and LMEval_SUMMARY.json entries of one ``simple_evaluate`` result."""
    entries = _entries(res, name)
    better = (res.get("higher_is_better") or {}).get(name) or {}
    parts, summary = {}, {}
    for key, value in entries.items():
        if "," not in key or "_stderr," in key:
            continue
        m = _metric_name(key)
        base = key.split(",", 1)[0]
        stderr_key = key.replace(f"{base},", f"{base}_stderr,", 1)
        stderr = _number(entries.get(stderr_key))
        hib = better.get(base, True)
        parts[f"{name}/{m}"] = Score(_number(value), stderr=stderr, better="higher" if hib else "lower")
        summary[f"{name}/{m}"] = _number(value)
        summary[f"{name}/{_metric_name(stderr_key)}"] = stderr
    return parts, summary


@metric("lm_eval", better="higher", version=1, into=METRICS)
def lm_eval_metric(ctx, tasks=None, num_fewshot: int | None = None, limit: int | float | None = None,
                   batch_size: int | None = None, apply_chat_template: bool = False,
                   system_instruction: str | None = None, fewshot_as_multiturn: bool | None = None,
                   include_path=None, bootstrap_iters: int = 100000) -> Score:
    """lm-evaluation-harness tasks on the in-memory model: one "<task>/<metric>" value each, with stderr."""
    version = require()
    names = _task_list(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(_include_paths(ctx, include_path), names)
    objs = {n: _load(tm, n, ctx.task.name) for n in names}  # every task's data before the first forward
    with _quiet():
        lm = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=int(batch_size or ctx.batch_size))
    limit = limit if limit is not None else ctx.limit
    parts, summary, samples, rows, info = {}, {}, {}, [], {}
    for name, obj in objs.items():
        kwargs = {"num_fewshot": num_fewshot, "limit": limit, "log_samples": True,
                  "apply_chat_template": bool(apply_chat_template), "system_instruction": system_instruction,
                  "bootstrap_iters": int(bootstrap_iters)}
        if fewshot_as_multiturn is not None:
            kwargs["fewshot_as_multiturn"] = bool(fewshot_as_multiturn)
        with _quiet():
            res = simple_evaluate(model=lm, tasks=[obj], task_manager=tm, **kwargs)
        p, s = parts_of(res, name)
        if not p:
            raise HarnessError(f"lm-eval task '{name}' (metric 'lm_eval' of task '{ctx.task.name}') reported no "
                               "metric values")
        parts.update(p)
        summary.update(s)
        samples[name] = res.get("samples") or {}
        for sub, docs in samples[name].items():
            for doc in docs:
                rows.append({"task": sub, **({"group": name} if sub != name else {}),
                             "index": doc.get("doc_id"), **{k: v for k, v in doc.items() if k != "doc_id"}})
        info[name] = {"versions": res.get("versions"), "n-shot": res.get("n-shot"),
                      "n-samples": res.get("n-samples")}
    return Score(None, parts=parts, rows=rows,
                 extra={"lm_eval_version": version, "tasks": info},
                 exports={f"{EXPORT}_EVAL.json": samples, f"{EXPORT}_SUMMARY.json": summary})


def include_fingerprints(task) -> dict[str, str]:
    """Content fingerprints of the files (task YAML, data, helpers) under the include directories of a task's
    ``lm_eval`` entries, for the run identity (data files elsewhere are not seen)."""
    from types import SimpleNamespace

    from harness.fingerprint import fingerprint

    out = {}
    for name, args in task.metrics:
        if name != "lm_eval":
            continue
        for d in _include_paths(SimpleNamespace(task=task), args.get("include_path")):
            for f in sorted(Path(d).rglob("*")):
                if f.is_file() and f.suffix in (".yaml", ".yml", ".jsonl", ".json", ".py", ".txt", ".csv"):
                    out[str(f)] = fingerprint(f)
    return out


def check_tasks(task) -> None:
    """Before training (``harness run``): every lm-eval task of ``task``'s ``lm_eval`` entries exists and its
    data loads, so a missing dataset stops the run before the unlearning work instead of after it."""
    from types import SimpleNamespace

    for name, args in task.metrics:
        if name != "lm_eval":
            continue
        names = _task_list(args.get("tasks"))
        tm = task_manager(_include_paths(SimpleNamespace(task=task), args.get("include_path")), names)
        for n in names:
            _load(tm, n, task.name)


def with_overrides(metrics: list[tuple[str, dict]], *, tasks: list[str] | None = None,
                   utility: list[str] | None = None, include: list[str] | None = None,
                   **args) -> list[tuple[str, dict]]:
    """A task's metric list with the command line's lm-eval settings: ``tasks`` replaces the task list of
    its ``lm_eval`` entries, ``utility`` adds tasks (and an ``lm_eval`` entry where there is none),
    ``include`` adds custom-task directories, the other ``args`` (None: not given) replace theirs."""
    out = [(n, dict(a)) for n, a in metrics]
    if (tasks or utility) and not any(n == "lm_eval" for n, _ in out):
        out.append(("lm_eval", {"tasks": []}))
    for name, a in out:
        if name != "lm_eval":
            continue
        if tasks:
            a["tasks"] = list(tasks)
        if utility:
            have = _as_list(a.get("tasks"))
            a["tasks"] = have + [t for t in utility if t not in have]
        if include:
            a["include_path"] = _as_list(a.get("include_path")) + [str(Path(p).resolve()) for p in include]
        a.update({k: v for k, v in args.items() if v is not None})
    return out


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [t.strip() for t in v.split(",") if t.strip()]
    return list(v)


@hookimpl
def register_metrics(register):
    for m in METRICS:
        register(m)
