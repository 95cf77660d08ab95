"""The base of the errors a user can fix (bad input, config, files): ``iacn`` prints their message,
naming the file/line/field, without a traceback."""

from __future__ import annotations

__all__ = ["UserError", "TrainingInterrupted"]


class UserError(Exception):
    """Bad input, configuration or files (not a bug): the CLI reports it in one line, exit status 2."""


class TrainingInterrupted(KeyboardInterrupt):
    """A one-process run stopped by Ctrl-C or SIGTERM after its step in progress, checkpointed. A
    ``KeyboardInterrupt`` (callers that catch ``Exception`` do not swallow it); ``signum`` is the
    signal's number (the CLI exits with 128 + signum, as a signalled process would)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
