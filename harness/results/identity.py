"""A run's identity beyond its settings: the checks of its inputs that need no model, and what changes its
numbers (content fingerprints of local inputs, the versions of the metrics it computes, SCORING_VERSION).
Shared by ``harness run`` and ``harness eval``."""

from __future__ import annotations

from harness import SCORING_VERSION, HarnessError


def check_inputs(task, choice, data_dir, registry) -> None:
    """The checks of a task's inputs that need no model: its metrics, its data (``--data-dir``) and a
    reference log."""
    from harness.data.splits import check_data_dir
    from harness.scoring.reference import check_reference
    from harness.tasks import suggest

    for name, _ in task.metrics:
        if name not in registry.metrics:
            raise HarnessError(f"task '{task.name}' ({task.file}): unknown metric '{name}'"
                               f"{suggest(name, registry.metrics)}; see `harness ls metrics`")
    if any(name == "lm_eval" for name, _ in task.metrics):
        from harness.metrics.lmeval import require

        require()  # the extra is missing: say so before any model is loaded
    check_data_dir(data_specs(task, choice, data_dir), data_dir, what=f"task '{task.name}'")
    check_reference(choice.reference, task)


def data_specs(task, choice, data_dir) -> dict:
    """The splits a run of ``task`` on ``choice`` reads (a declared tiny fallback applied)."""
    from harness.data import corpus

    return corpus.run_data_specs(task, data_dir, tiny=corpus.is_tiny_model(choice.start))


def identity_config(task, choice, registry, data_dir) -> dict:
    """What, besides the settings, changes a run's numbers: the content of every local input (checkpoint,
    tokenizer, template file, reference, data files), the versions of the metrics it computes and the
    harness's scoring version. Part of the run hash of ``harness run`` and ``harness eval`` alike."""
    from harness.data.splits import data_fingerprints

    out = {"scoring_version": SCORING_VERSION, "metrics": metric_versions(task, registry),
           **choice.fingerprints(task.benchmark), "data": data_fingerprints(data_specs(task, choice, data_dir),
                                                                           data_dir)}
    if any(name == "lm_eval" for name, _ in task.metrics):
        from harness.metrics.lmeval import include_fingerprints, installed_version

        out["lm_eval_version"] = installed_version()  # its tasks and prompts change between releases
        out["lm_eval_include"] = include_fingerprints(task)  # custom lm-eval tasks and their files
    return out


def metric_versions(task, registry) -> dict[str, int]:
    """Versions of the task's metrics and of the metrics they compute on the way. A metric names its
    dependencies as strings (``ctx.score("forget_truth_ratio")``) in its code, its closure or module
    tables it reads (``UTILITY_PARTS``), and tasks may pass metric names as arguments: any such string
    that is a registered metric counts (an extra one only makes the identity stricter)."""
    known = registry.metrics
    todo = [n for n, _ in task.metrics] + [v for _, args in task.metrics for v in _strings(args)]
    seen: dict[str, int] = {}
    while todo:
        name = todo.pop()
        if name in seen or name not in known:
            continue
        m = known[name]
        seen[name] = m.version
        todo += [v for v in _code_strings(m.fn) if v in known]
    return dict(sorted(seen.items()))


def _strings(v) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, (list, tuple, set, frozenset)):
        return [s for x in v for s in _strings(x)]
    return []


def _code_strings(fn, seen: set | None = None) -> list[str]:
    """String constants of ``fn``, its closure, the module globals it reads and (recursively) the
    helper functions of its own module that it calls."""
    seen = set() if seen is None else seen
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return []
    seen.add(code)
    glob = getattr(fn, "__globals__", {})
    out = []
    stack = [code]
    while stack:
        c = stack.pop()
        for k in c.co_consts:
            if hasattr(k, "co_consts"):
                stack.append(k)
            else:
                out += _strings(k)
        for n in c.co_names:
            v = glob.get(n)
            if callable(v) and getattr(v, "__module__", None) == getattr(fn, "__module__", None):
                out += _code_strings(v, seen)
            else:
                out += _strings(v)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out += _strings(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out
