"""The base of the errors a user can fix (bad input, config, files): ``iacn`` prints their message,
naming the file/line/field, without a traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input, configuration or files (not a bug): the CLI reports it in one line, exit status 2."""
