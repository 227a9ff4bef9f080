"""Exit codes and the error types every command turns into them.

0 every check passed, 1 a threshold failed, 2 a usage or environment error (one line on
stderr, never a traceback), 130 interrupted.  Judges never raise these: they return
results as data, and only a command turns a result into an exit code.
"""
from __future__ import annotations

from typing import Optional

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


class ReportError(UsageError):
    """A run folder ``parity report`` cannot read (one line, exit 2)."""


class RunError(UsageError):
    """A usage or environment error of a run: one clear line naming the side and the cause; exit 2."""

    def __init__(self, message: str, side: str = "runner", cause: str = "usage", log: Optional[str] = None):
        super().__init__(message)
        self.side, self.cause, self.log = side, cause, log


class WorkerError(RuntimeError):
    """A serving worker failed: one line naming the backend and the phase."""

    def __init__(self, backend: str, message: str, code: Optional[int] = None, phase: Optional[str] = None):
        super().__init__(message)
        self.backend, self.code, self.phase = backend, code, phase
