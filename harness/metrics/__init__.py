"""Metric contract: a function ``(ctx, **args) -> Score`` registered by name.

Metric modules in this package register through the ``register_metrics`` hook like
third-party plugins do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from harness import HarnessError

# One source of the better-direction arrows every table prints.
ARROWS = {"higher": "↑", "lower": "↓", "zero": "→0", "one": "→1"}


@dataclass
class Score:
    """One metric result. ``per_sample`` maps dataset index -> value or dict (kept for KS tests
    and the open-unlearning ``value_by_index`` export); ``extra`` holds e.g. MIA sub-results.

    A metric that reports several numbers (``lm_eval``: one per lm-eval task and metric) returns them as
    ``parts``: name -> Score, each with its own ``better`` and ``stderr``; they land in scores.json and the
    tables under their own flat names instead of the parent. ``exports`` (file name -> JSON document) are
    files of the metric's own in the run directory (``LMEval_EVAL.json``); a metric with exports stays out
    of the task's ``<BENCH>_EVAL.json``. ``rows`` are samples.jsonl rows beyond ``per_sample``."""

    value: float | None
    per_sample: dict | None = None
    extra: dict = field(default_factory=dict)
    stderr: float | None = None
    better: str | None = None  # a part's direction; None: the metric's declared one
    parts: dict[str, Score] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    rows: list[dict] | None = None


def flat_scores(scores: dict[str, Score]) -> list[tuple[str, Score, str]]:
    """(name, score, parent metric) with every multi-valued score replaced by its parts."""
    out = []
    for name, s in scores.items():
        if s.parts:
            out += [(pname, p, name) for pname, p in s.parts.items()]
        else:
            out.append((name, s, name))
    return out


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., Score]
    better: str = "higher"  # higher | lower | zero | one
    needs_reference: bool = False
    version: int = 1
    description: str = ""
    summary: bool = True  # appears in *_SUMMARY.json when requested at top level


def metric(name: str, *, better: str = "higher", needs_reference: bool = False,
           version: int = 1, description: str = "", summary: bool = True,
           into: list | None = None) -> Callable[[Callable[..., Score]], Callable[..., Score]]:
    """Decorator: wrap ``fn`` as a ``Metric`` and append it to ``into`` (a module-level list
    that the module's ``register_metrics`` hookimpl hands to ``register``)."""

    def wrap(fn):
        m = Metric(name, fn, better, needs_reference, version, description or (fn.__doc__ or "").strip().split("\n")[0], summary)
        if into is not None:
            into.append(m)
        fn.metric = m
        return fn

    return wrap


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
