"""Errors a user can fix, as one line and an exit status: shared by every command-line entry point (`arpg-hf`, the
conversion script, the demo, the pipelines/ jobs), which import it from here rather than from one another."""

from __future__ import annotations

import os
import sys
from typing import Callable

# Failures that come from the user's input rather than from a bug.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def run_guarded(function: Callable[[], object], prog: str = "arpg-hf") -> int:
    """Runs `function`; user errors become one line on stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        function()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("ARPG_HF_TRACEBACK"):
            raise
        message = str(error).strip() or type(error).__name__
        if isinstance(error, KeyError):
            message = f"missing entry {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
