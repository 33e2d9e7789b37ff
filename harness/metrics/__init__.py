"""Metric contract: a function ``(ctx, **args) -> Score`` registered by name.

Metric modules in this package register through the ``register_metrics`` hook like
third-party plugins do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Score:
    """One metric result. ``per_sample`` maps dataset index -> value or dict (kept for KS tests
    and the open-unlearning ``value_by_index`` export); ``extra`` holds e.g. MIA sub-results."""

    value: float | None
    per_sample: dict | None = None
    extra: dict = field(default_factory=dict)


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
