"""The one base class of the errors a user can fix.

Every bad input the framework refuses (an unknown solver or option, a malformed data file, a
corrupt checkpoint, an SDE/solver pair that cannot work, a model that returns NaN) raises a
subclass of :class:`UserError`, whose message names the setting and the fix. ``run.py`` prints
such an error as one line ``error: …`` and exits with code 2; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "RunInterrupted", "Preempted"]


class UserError(ValueError):
    """Bad input or settings: the message says what is wrong and how to fix it.

    A ValueError, so that code catching ValueError around the library keeps working.
    """


class RunInterrupted(UserError):
    """The run was stopped by SIGINT or SIGTERM; the message says what was kept (``run.py`` exits with 130)."""

    exit_code = 130


class Preempted(RunInterrupted):
    """Training was stopped by SIGTERM after its current step was checkpointed (``run.py`` exits with 143);
    ``task.resume=auto`` in the same run directory continues it exactly."""

    exit_code = 143
