"""Module outputs ("activations") captured during a forward pass a method already runs (RMU's layer-7 hidden
states), by a forward hook on the one module whose name full-matches a regex, removed on exit.

    with capture(model, r"model\\.layers\\.7") as act:
        logits = forward_logits(model, part)
    hidden = act.output                      # (B, T, d), with grad

Hooks sit on the module, not on parameter reads, so this works under DeepSpeed ZeRO-3 (the module's
forward runs with its gathered parameters) and through accelerate's DDP/DeepSpeed wrappers (names are
matched on the wrapped model, without their ``module.`` prefix).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harness import HarnessError

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "OptimizedModule")


def unwrap(model):
    """The model inside accelerate/DeepSpeed/torch.compile wrappers (module names as the user sees them)."""
    while type(model).__name__ in _WRAPPERS:
        model = getattr(model, "module", None) or model._orig_mod
    return model


def find_module(model, regex: str) -> tuple[str, Any]:
    """``(name, module)`` of the unique module whose name full-matches ``regex``; anything else is an error."""
    net = unwrap(model)
    hits = [(n, m) for n, m in net.named_modules() if re.fullmatch(regex, n)]
    if len(hits) != 1:
        names = [n for n, _ in net.named_modules() if n]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        what = "no module" if not hits else f"{len(hits)} modules ({', '.join(n for n, _ in hits[:4])})"
        raise HarnessError(f"activation module regex {regex!r} full-matches {what}; it must match exactly one "
                           f"(modules: {shown})")
    return hits[0]


@dataclass
class Capture:
    """The captured output of the module ``name`` in the last forward pass (``None`` before one ran)."""

    name: str
    output: Any = None


@contextmanager
def capture(model, regex: str):
    """Capture the output of the module matching ``regex`` (its first element when it returns a tuple,
    the hidden states of a decoder layer) during the forward passes inside the ``with`` block."""
    name, module = find_module(model, regex)
    cap = Capture(name)

    def hook(_mod, _inputs, output):
        cap.output = output[0] if isinstance(output, (tuple, list)) else output

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()
