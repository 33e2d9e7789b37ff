"""unlearn-harness: plugin-based harness for LLM unlearning experiments."""

import pluggy

__version__ = "0.1.0"
# Part of every run identity (run and eval directories, reference caches): bump it when a change of
# the harness changes what a metric or loss computes, so results of the old semantics are not reused.
# Not __version__: a release that changes no number must keep finished results valid.
SCORING_VERSION = 1

PROJECT = "unlearn_harness"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)


class HarnessError(Exception):
    """An error the user can fix; the CLI prints it as one line (traceback only with --debug)."""
