"""unlearn-harness: plugin-based harness for LLM unlearning experiments."""

import pluggy

__version__ = "0.1.0"

PROJECT = "unlearn_harness"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)


class HarnessError(Exception):
    """An error the user can fix; the CLI prints it as one line (traceback only with --debug)."""
