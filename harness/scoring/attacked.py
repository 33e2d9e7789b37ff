"""Scoring after attacks: each attack transforms a copy of the scored model, and the task's ``attack:``
metrics (forget side, then the utility summary) are scored on it through the same ``EvalContext`` as the
model itself. An attack that trained on part of the forget data names held-out rows; the un-attacked model
is scored on those rows too (``before``), so before and after always compare the same rows."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import HarnessError
from harness.attacks import AttackInput, describe
from harness.metrics import Score


@dataclass
class AttackOutcome:
    name: str
    version: int
    settings: dict
    info: dict
    metrics: list[str]                                   # forget side, then utility, in the task's order
    after: dict[str, Score] = field(default_factory=dict)
    before: dict[str, Score] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self) -> dict:
        """The ``attacks`` block of scores.json for this attack."""
        return {"version": self.version, "settings": self.settings, "info": self.info, "metrics": self.metrics,
                "seconds": round(self.seconds, 1)}


def attack_metrics(task) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(forget-side, utility) metrics of ``task``'s ``attack:`` block, with the task's arguments; names the
    task does not score are skipped (a base's list serves tasks with smaller suites)."""
    spec = task.attack
    if spec is None:
        raise HarnessError(f"task '{task.name}' ({task.file}) has no 'attack:' block, so --attacks does not know "
                           "which metrics to score again; add one (docs/tasks.md)")
    args = dict(task.metrics)
    forget = [(n, args[n]) for n in spec.metrics if n in args]
    utility = [(n, args[n]) for n in spec.utility if n in args and n not in spec.metrics]
    if not forget:
        raise HarnessError(f"task '{task.name}' ({task.file}): attack.metrics {list(spec.metrics)} names none of "
                           f"the task's metrics {list(args)}")
    return forget, utility


def check_attack_metrics(task, registry) -> None:
    """Before any work: the ``attack:`` block names registered metrics and leaves something to score."""
    from harness.tasks import suggest

    if task.attack is not None:
        for name in (*task.attack.metrics, *task.attack.utility):
            if name not in registry.metrics:
                raise HarnessError(f"task '{task.name}' ({task.file}): attack: unknown metric '{name}'"
                                   f"{suggest(name, registry.metrics)}")
    attack_metrics(task)


def run_attacks(attacks, model, main_scores: dict[str, Score], make_ctx: Callable, inp: AttackInput) -> list[AttackOutcome]:
    """Attack copies of ``model`` one after another and score each; ``make_ctx(model, subset, label)``
    builds an ``EvalContext`` with the settings the model was scored with."""
    forget, utility = attack_metrics(inp.task)
    names = [n for n, _ in forget + utility]
    outcomes = []
    for attack in attacks:
        t0 = time.perf_counter()
        desc = describe(attack)
        attacked = attack.apply(inp)
        if attacked.model is model:
            raise HarnessError(f"attack '{attack.name}' returned the scored model itself; attacks work on a copy")
        out = AttackOutcome(attack.name, desc["version"], desc["settings"], attacked.info, names)
        subset = attacked.heldout or None
        after = make_ctx(attacked.model, subset, f"{attack.name} attacked")
        score_in_eval_mode(after, forget + utility)
        out.after = {n: after.scores[n] for n in names}
        if subset:
            before = make_ctx(model, subset, f"{attack.name} before")
            score_in_eval_mode(before, forget)
            out.before = {n: before.scores[n] for n, _ in forget}
            out.before.update({n: main_scores[n] for n, _ in utility})
        else:
            out.before = {n: main_scores[n] for n in names}
        del attacked, after
        gc.collect()
        out.seconds = time.perf_counter() - t0
        outcomes.append(out)
    return outcomes


def score_in_eval_mode(ctx, wanted) -> None:
    """Score ``wanted`` ((name, args) pairs) on ``ctx`` with its model in eval mode, restoring the mode after."""
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        for name, args in wanted:
            ctx.score(name, **args)
    finally:
        model.train(was_training)


def flat_scores(outcomes: list[AttackOutcome]) -> dict[str, Score]:
    """``attack/<name>/<metric>`` (after the attack) and ``attack/<name>/before/<metric>`` (same rows, before)."""
    out: dict[str, Score] = {}
    for o in outcomes:
        out.update({f"attack/{o.name}/{n}": s for n, s in o.after.items()})
        out.update({f"attack/{o.name}/before/{n}": s for n, s in o.before.items()})
    return out
